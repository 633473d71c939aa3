//! Reader for the eBPF conformance suite's `.data` files (format in `shared/conformance/README.md`).

use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::isa::{self, Program, RawInsn};

/// One conformance test case.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TestCase {
    /// The test's name: its file name without `.data`.
    pub name: String,
    /// The `-- asm` section.
    pub asm: String,
    /// The `-- raw` words, when present; they replace the assembled program.
    pub raw: Option<Vec<u64>>,
    /// Input memory.
    pub mem: Vec<u8>,
    /// Expected r0.
    pub result: u64,
}

/// Why a test case could not be loaded, parsed or turned into a program.
#[derive(Debug, Error)]
pub enum ConformanceError {
    /// A file or directory could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A malformed section, a missing `-- result`, or a program that does not assemble or decode.
    #[error("{name}: {what}")]
    Format {
        /// The test's name.
        name: String,
        /// What was wrong, including the assembler's or decoder's message.
        what: String,
    },
    /// A `-- mem` line is not valid hex.
    #[error(
        "{name}: line {line}: bad hex in -- mem: {source}; expected pairs of hex digits such as `01 ff`"
    )]
    Mem {
        /// The test's name.
        name: String,
        /// 1-based line in the `.data` file.
        line: usize,
        /// Where on the line, and why.
        source: HexError,
    },
}

/// A `-- result` or `-- raw` value: `0x` and hex digits, or decimal digits after an optional `-`
/// (two's complement). Nothing else: `from_str_radix` and `parse` would also take a `+`.
fn parse_u64(s: &str) -> Option<u64> {
    let s = s.trim();
    let (neg, radix, digits) =
        if let Some(hex) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
            (false, 16, hex)
        } else if let Some(dec) = s.strip_prefix('-') {
            (true, 10, dec)
        } else {
            (false, 10, s)
        };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return None;
    }
    let v = u64::from_str_radix(digits, radix).ok()?;
    Some(if neg { v.wrapping_neg() } else { v })
}

/// Where in a hex text a problem is: 1-based, the line only when the text has several.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HexPos {
    /// 1-based line, `None` when the text is a single line.
    pub line: Option<usize>,
    /// 1-based column, counted in characters.
    pub column: usize,
}

impl std::fmt::Display for HexPos {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.line {
            Some(line) => write!(f, "line {line}, column {}", self.column),
            None => write!(f, "column {}", self.column),
        }
    }
}

/// Why a hex text was rejected.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum HexError {
    /// A character that is neither an ASCII hex digit nor ASCII whitespace.
    #[error("{at}: `{}` is not a hex digit", .found.escape_debug())]
    NotHex {
        /// Where the character is.
        at: HexPos,
        /// The character.
        found: char,
    },
    /// A whitespace-separated group with an odd number of digits; `group` is its start.
    #[error("{at}: `{group}` has an odd number of hex digits (a byte is two)")]
    OddDigits {
        /// Where the group starts.
        at: HexPos,
        /// Its first characters (at most 16).
        group: String,
    },
}

/// Parses bytes written as pairs of hex digits, in groups separated by ASCII whitespace
/// (`01 ff`, `01ff`, `0102 ff`). A pair never spans whitespace, and nothing else is accepted:
/// no `0x`, no signs, no other separators.
pub fn parse_hex_bytes(text: &str) -> Result<Vec<u8>, HexError> {
    let multiline = text.trim_end().contains('\n');
    let mut out = Vec::with_capacity(text.len() / 2);
    let (mut line, mut column) = (1, 0);
    let pos = |line, column| HexPos {
        line: multiline.then_some(line),
        column,
    };
    // The high digit of the byte being read, where its group started, and that position.
    let mut high: Option<u8> = None;
    let mut group: Option<(usize, HexPos)> = None;
    for (i, c) in text.char_indices() {
        column += 1;
        if c.is_ascii_whitespace() {
            if high.is_some() {
                let (start, at) = group.expect("a digit opened the group");
                let group = text[start..i].chars().take(16).collect();
                return Err(HexError::OddDigits { at, group });
            }
            group = None;
            if c == '\n' {
                line += 1;
                column = 0;
            }
            continue;
        }
        let Some(digit) = c.to_digit(16) else {
            return Err(HexError::NotHex {
                at: pos(line, column),
                found: c,
            });
        };
        group.get_or_insert((i, pos(line, column)));
        match high.take() {
            Some(h) => out.push(h << 4 | digit as u8),
            None => high = Some(digit as u8),
        }
    }
    match (high, group) {
        (Some(_), Some((start, at))) => Err(HexError::OddDigits {
            at,
            group: text[start..].chars().take(16).collect(),
        }),
        _ => Ok(out),
    }
}

impl TestCase {
    /// Parses the text of one `.data` file.
    pub fn parse(name: &str, text: &str) -> Result<TestCase, ConformanceError> {
        let err = |what: String| ConformanceError::Format {
            name: name.to_string(),
            what,
        };
        let mut section = String::new();
        let (mut asm, mut mem, mut result, mut raw) = (String::new(), Vec::new(), None, None);
        for (i, line) in text.lines().enumerate() {
            if let Some(s) = line.strip_prefix("-- ") {
                section = s.trim().to_string();
                continue;
            }
            match section.as_str() {
                "asm" => {
                    asm.push_str(line);
                    asm.push('\n');
                }
                _ if line.trim_start().starts_with('#') || line.trim().is_empty() => {}
                "mem" => {
                    mem.extend(
                        parse_hex_bytes(line).map_err(|source| ConformanceError::Mem {
                            name: name.to_string(),
                            line: i + 1,
                            source,
                        })?,
                    )
                }
                "result" => {
                    result = Some(
                        parse_u64(line).ok_or_else(|| err(format!("bad result value `{line}`")))?,
                    );
                }
                "raw" => raw
                    .get_or_insert_with(Vec::new)
                    .push(parse_u64(line).ok_or_else(|| err(format!("bad raw word `{line}`")))?),
                _ => {}
            }
        }
        Ok(TestCase {
            name: name.to_string(),
            asm,
            raw,
            mem,
            result: result.ok_or_else(|| err("no -- result section".into()))?,
        })
    }

    /// Reads and parses a `.data` file.
    pub fn load(path: &Path) -> Result<TestCase, ConformanceError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConformanceError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        TestCase::parse(&name, &text)
    }

    /// The program to run: the raw words if given, else the assembled `-- asm`.
    pub fn program(&self) -> Result<Program, ConformanceError> {
        let err = |what: String| ConformanceError::Format {
            name: self.name.clone(),
            what,
        };
        match &self.raw {
            Some(words) => {
                let bytes: Vec<u8> = words
                    .iter()
                    .flat_map(|w| RawInsn::from_u64(*w).to_bytes())
                    .collect();
                isa::Program::decode(&bytes).map_err(|e| err(e.to_string()))
            }
            None => crate::asm::assemble_program(&self.asm).map_err(|e| err(e.to_string())),
        }
    }
}

/// All `.data` files in `dir`, sorted by name.
pub fn load_dir(dir: &Path) -> Result<Vec<TestCase>, ConformanceError> {
    let io = |source| ConformanceError::Io {
        path: dir.to_path_buf(),
        source,
    };
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "data"))
        .collect();
    paths.sort();
    paths.iter().map(|p| TestCase::load(p)).collect()
}

/// Where the shared conformance data lives relative to the crate, if it is there.
pub fn shared_dir() -> Option<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/conformance");
    dir.is_dir().then_some(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sections() {
        let text = "# c\n-- asm\nmov %r0, %r2\nexit\n-- mem\n00 01\n02 ff\n-- result\n0x4\n";
        let t = TestCase::parse("x", text).unwrap();
        assert_eq!(t.mem, [0, 1, 2, 0xff]);
        assert_eq!(t.result, 4);
        assert!(t.asm.contains("exit"));
        assert!(TestCase::parse("x", "-- asm\nexit\n").is_err());
        assert_eq!(parse_hex_bytes("b7  00  2a  "), Ok(vec![0xb7, 0, 0x2a]));
        assert!(TestCase::parse("x", "-- asm\nexit\n-- mem\n0 1\n-- result\n0\n").is_err());
    }

    #[test]
    fn hex_is_digit_pairs_in_whitespace_separated_groups() {
        let at = |line, column| HexPos { line, column };
        assert_eq!(parse_hex_bytes(""), Ok(vec![]));
        assert_eq!(
            parse_hex_bytes("0102 FF\n\tab\r\n"),
            Ok(vec![1, 2, 0xff, 0xab])
        );
        assert_eq!(
            parse_hex_bytes("+1+2"),
            Err(HexError::NotHex {
                at: at(None, 1),
                found: '+'
            })
        );
        assert_eq!(
            parse_hex_bytes("00\n 0x1"),
            Err(HexError::NotHex {
                at: at(Some(2), 3),
                found: 'x'
            })
        );
        assert_eq!(
            parse_hex_bytes("aa b70"),
            Err(HexError::OddDigits {
                at: at(None, 4),
                group: "b70".into()
            })
        );
        assert_eq!(
            parse_hex_bytes("0 1"),
            Err(HexError::OddDigits {
                at: at(None, 1),
                group: "0".into()
            })
        );
        // Non-ASCII digits and whitespace are not hex.
        assert!(parse_hex_bytes("\u{663}\u{663}").is_err());
        assert!(parse_hex_bytes("00\u{a0}00").is_err());
        let e = parse_hex_bytes("0\0").unwrap_err().to_string();
        assert_eq!(e, "column 2: `\\0` is not a hex digit");
    }

    #[test]
    fn numbers_are_digits_only() {
        assert_eq!(parse_u64("0x1f"), Some(0x1f));
        assert_eq!(parse_u64("-1"), Some(u64::MAX));
        assert_eq!(parse_u64(" 42 "), Some(42));
        for bad in ["0x+5", "0x-5", "+5", "-+5", "--5", "0x", "-", "", "5 5"] {
            assert_eq!(parse_u64(bad), None, "{bad}");
        }
    }
}
