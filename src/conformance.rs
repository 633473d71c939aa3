//! Reader for the eBPF conformance suite's `.data` files (format in `shared/conformance/README.md`).

use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::isa::{self, Program, RawInsn};

/// One conformance test case.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TestCase {
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

#[derive(Debug, Error)]
pub enum ConformanceError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{name}: {what}")]
    Format { name: String, what: String },
}

fn parse_u64(s: &str) -> Option<u64> {
    let s = s.trim();
    if let Some(hex) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        u64::from_str_radix(hex, 16).ok()
    } else if let Some(neg) = s.strip_prefix('-') {
        neg.parse::<u64>().ok().map(|v| v.wrapping_neg())
    } else {
        s.parse().ok()
    }
}

/// Parses hex bytes separated by whitespace, or runs of contiguous hex digits.
pub fn parse_hex_bytes(text: &str) -> Option<Vec<u8>> {
    let digits: String = text.split_whitespace().collect();
    if !digits.len().is_multiple_of(2) {
        return None;
    }
    (0..digits.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(digits.get(i..i + 2)?, 16).ok())
        .collect()
}

impl TestCase {
    /// Parses the text of one `.data` file.
    pub fn parse(name: &str, text: &str) -> Result<TestCase, ConformanceError> {
        let err = |what: String| ConformanceError::Format {
            name: name.to_string(),
            what,
        };
        let mut section = String::new();
        let (mut asm, mut mem, mut result, mut raw) = (String::new(), String::new(), None, None);
        for line in text.lines() {
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
                    mem.push_str(line);
                    mem.push(' ');
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
            mem: parse_hex_bytes(&mem).ok_or_else(|| err("bad hex in -- mem".into()))?,
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
        assert_eq!(parse_hex_bytes("b7  00  2a  "), Some(vec![0xb7, 0, 0x2a]));
        assert_eq!(parse_hex_bytes("b70"), None);
    }
}
