//! `bpf_trace_printk` and `bpf_trace_vprintk` (what libbpf's `bpf_printk` expands to): the
//! kernel's format rules (`bpf_bprintf_prepare`: a NUL-terminated format, at most three
//! arguments for `trace_printk` and twelve for `trace_vprintk`, integer conversions with flags,
//! width, precision and `h`/`hh`/`l`/`ll`/`z` lengths, `%c`, `%s`, `%p`/`%px`, `%%`), written to
//! a sink the host chooses — standard error by default — instead of the kernel's trace pipe.
//!
//! Like the kernel, a malformed format or an unreadable pointer makes the helper return
//! `-EINVAL` and print nothing; a message is cut at [`MAX_MESSAGE`] bytes.

use std::sync::{Arc, RwLock};

use crate::exec::{Access, HelperContext};
use crate::helpers::Helpers;

/// The longest message (the kernel's `MAX_BPRINTF_BUF`, less its NUL).
pub const MAX_MESSAGE: usize = 1023;
/// Most arguments of `bpf_trace_vprintk` (`MAX_BPRINTF_VARARGS`).
pub const MAX_VARARGS: usize = 12;
/// Longest string a `%s` reads.
const MAX_STR: usize = MAX_MESSAGE;

/// Where `bpf_trace_printk` messages go: one call per message, without a trailing newline
/// added (programs usually end their format with `\n`, as they do for the kernel's trace pipe).
pub type PrintkSink = Arc<dyn Fn(&str) + Send + Sync>;

static SINK: RwLock<Option<PrintkSink>> = RwLock::new(None);

/// Sends every program's `bpf_printk` messages to `sink` from now on (`None`: standard error,
/// the default).
pub fn set_printk_sink(sink: Option<PrintkSink>) {
    *SINK.write().unwrap_or_else(|e| e.into_inner()) = sink;
}

fn emit(message: &str) {
    let sink = SINK.read().unwrap_or_else(|e| e.into_inner()).clone();
    match sink {
        Some(f) => f(message),
        None => {
            use std::io::Write;
            let mut err = std::io::stderr().lock();
            let _ = err.write_all(message.as_bytes());
            if !message.ends_with('\n') {
                let _ = err.write_all(b"\n");
            }
        }
    }
}

/// Formats `fmt` (bytes up to its NUL) with `args`, as the kernel would; `read_str` reads a
/// NUL-terminated string at an address (for `%s`), `None` when it may not be read. `Err` is
/// the helper's negative errno.
pub fn format(
    fmt: &[u8],
    args: &[u64],
    read_str: &dyn Fn(u64) -> Option<Vec<u8>>,
) -> Result<String, i64> {
    let einval = -(libc::EINVAL as i64);
    let mut out: Vec<u8> = Vec::new();
    let mut next_arg = args.iter();
    let mut i = 0;
    while i < fmt.len() {
        let c = fmt[i];
        i += 1;
        if c != b'%' {
            out.push(c);
            continue;
        }
        if fmt.get(i) == Some(&b'%') {
            out.push(b'%');
            i += 1;
            continue;
        }
        let mut spec = Spec::default();
        while let Some(&f) = fmt.get(i) {
            match f {
                b'-' => spec.left = true,
                b'0' => spec.zero = true,
                b'+' => spec.plus = true,
                b' ' => spec.space = true,
                b'#' => spec.alt = true,
                _ => break,
            }
            i += 1;
        }
        while let Some(d) = fmt.get(i).filter(|d| d.is_ascii_digit()) {
            spec.width = spec.width * 10 + (d - b'0') as usize;
            i += 1;
            if spec.width > MAX_MESSAGE {
                return Err(einval);
            }
        }
        if fmt.get(i) == Some(&b'.') {
            i += 1;
            let mut p = 0usize;
            while let Some(d) = fmt.get(i).filter(|d| d.is_ascii_digit()) {
                p = p * 10 + (d - b'0') as usize;
                i += 1;
                if p > MAX_MESSAGE {
                    return Err(einval);
                }
            }
            spec.precision = Some(p);
        }
        let mut bits = 32;
        match (fmt.get(i), fmt.get(i + 1)) {
            (Some(b'l'), Some(b'l')) => {
                bits = 64;
                i += 2;
            }
            (Some(b'h'), Some(b'h')) => {
                bits = 8;
                i += 2;
            }
            (Some(b'l' | b'z'), _) => {
                bits = 64;
                i += 1;
            }
            (Some(b'h'), _) => {
                bits = 16;
                i += 1;
            }
            _ => {}
        }
        let Some(&conv) = fmt.get(i) else {
            return Err(einval);
        };
        i += 1;
        let Some(&arg) = next_arg.next() else {
            return Err(einval);
        };
        let mask = if bits == 64 {
            u64::MAX
        } else {
            (1u64 << bits) - 1
        };
        let body: Vec<u8> = match conv {
            b'd' | b'i' => {
                let v = sign_extend(arg & mask, bits);
                let mut s = v.unsigned_abs().to_string();
                spec.apply_precision(&mut s);
                let sign = if v < 0 {
                    "-"
                } else if spec.plus {
                    "+"
                } else if spec.space {
                    " "
                } else {
                    ""
                };
                spec.numeric(sign, &s)
            }
            b'u' => {
                let mut s = (arg & mask).to_string();
                spec.apply_precision(&mut s);
                spec.numeric("", &s)
            }
            b'x' | b'X' | b'o' => {
                let v = arg & mask;
                let mut s = match conv {
                    b'x' => format!("{v:x}"),
                    b'X' => format!("{v:X}"),
                    _ => format!("{v:o}"),
                };
                spec.apply_precision(&mut s);
                let prefix = match (spec.alt && v != 0, conv) {
                    (true, b'x') => "0x",
                    (true, b'X') => "0X",
                    (true, _) => "0",
                    _ => "",
                };
                spec.numeric(prefix, &s)
            }
            b'c' => spec.pad(vec![arg as u8]),
            b's' => {
                let Some(mut s) = read_str(arg) else {
                    return Err(einval);
                };
                if let Some(p) = spec.precision {
                    s.truncate(p);
                }
                spec.pad(s)
            }
            b'p' => {
                // `%px` and plain `%p` print the address (the kernel hashes plain `%p`;
                // the `%pK`/`%pS`/IP forms are not supported).
                match fmt.get(i) {
                    Some(b'x') => i += 1,
                    Some(c) if c.is_ascii_alphanumeric() => return Err(einval),
                    _ => {}
                }
                spec.pad(format!("0x{arg:016x}").into_bytes())
            }
            _ => return Err(einval),
        };
        out.extend(body);
    }
    out.truncate(MAX_MESSAGE);
    Ok(String::from_utf8_lossy(&out).into_owned())
}

fn sign_extend(v: u64, bits: u32) -> i64 {
    let shift = 64 - bits;
    ((v << shift) as i64) >> shift
}

#[derive(Default)]
struct Spec {
    left: bool,
    zero: bool,
    plus: bool,
    space: bool,
    alt: bool,
    width: usize,
    precision: Option<usize>,
}

impl Spec {
    fn apply_precision(&self, digits: &mut String) {
        if let Some(p) = self.precision
            && digits.len() < p
        {
            digits.insert_str(0, &"0".repeat(p - digits.len()));
        }
    }

    /// A number with its sign or prefix, padded (zeros go after the sign).
    fn numeric(&self, sign: &str, digits: &str) -> Vec<u8> {
        let len = sign.len() + digits.len();
        if self.zero && !self.left && self.precision.is_none() && len < self.width {
            return format!("{sign}{}{digits}", "0".repeat(self.width - len)).into_bytes();
        }
        self.pad(format!("{sign}{digits}").into_bytes())
    }

    fn pad(&self, mut s: Vec<u8>) -> Vec<u8> {
        if s.len() < self.width {
            let fill = vec![b' '; self.width - s.len()];
            if self.left {
                s.extend(fill);
            } else {
                s.splice(0..0, fill);
            }
        }
        s
    }
}

/// Reads `len` bytes at `addr` if the run may read them (else ends it with the fault).
fn read_bytes(hctx: &mut HelperContext, addr: u64, len: usize) -> Option<Vec<u8>> {
    if !hctx.check(addr, len as u64, Access::Load) {
        return None;
    }
    let mut v = vec![0u8; len];
    // SAFETY: the run may read these bytes (checked above, or a trusted run, whose program
    // vouches for its pointers), and they stay valid while the helper runs inside it.
    unsafe { std::ptr::copy_nonoverlapping(addr as *const u8, v.as_mut_ptr(), len) };
    Some(v)
}

/// Reads a NUL-terminated string of at most [`MAX_STR`] bytes at `addr`, checking each byte
/// before reading it so that nothing past the NUL is touched. `None` when a byte may not be
/// read: the kernel's `%s` then fails the call (`-EINVAL`), so this does not end the run.
fn read_c_str(hctx: &HelperContext, addr: u64) -> Option<Vec<u8>> {
    let mut s = Vec::new();
    for k in 0..MAX_STR as u64 {
        let at = addr.checked_add(k)?;
        if !hctx.allows(at, 1, Access::Load) {
            return None;
        }
        // SAFETY: the run may read this byte (as in `read_bytes`).
        let b = unsafe { *(at as *const u8) };
        if b == 0 {
            return Some(s);
        }
        s.push(b);
    }
    Some(s)
}

/// The format bytes up to its NUL, which must lie within `size` bytes.
fn read_fmt(hctx: &mut HelperContext, fmt: u64, size: u64) -> Option<Vec<u8>> {
    if size == 0 || size > 64 * 1024 {
        return None;
    }
    let mut bytes = read_bytes(hctx, fmt, size as usize)?;
    let nul = bytes.iter().position(|&b| b == 0)?;
    bytes.truncate(nul);
    Some(bytes)
}

fn print(hctx: &mut HelperContext, fmt: u64, size: u64, args: &[u64]) -> u64 {
    let einval = -(libc::EINVAL as i64) as u64;
    let Some(fmt) = read_fmt(hctx, fmt, size) else {
        return einval;
    };
    match format(&fmt, args, &|a| read_c_str(hctx, a)) {
        Ok(message) => {
            emit(&message);
            message.len() as u64
        }
        Err(e) => e as u64,
    }
}

/// `long bpf_trace_printk(const char *fmt, u32 fmt_size, ...)`: up to three arguments.
///
/// # Safety
/// A context helper: `hctx` is the calling run's context.
pub unsafe extern "C" fn trace_printk(
    fmt: u64,
    size: u64,
    a: u64,
    b: u64,
    c: u64,
    hctx: *mut HelperContext,
) -> u64 {
    // SAFETY: the caller's contract.
    let hctx = unsafe { &mut *hctx };
    print(hctx, fmt, size as u32 as u64, &[a, b, c])
}

/// `long bpf_trace_vprintk(const char *fmt, u32 fmt_size, const void *data, u32 data_len)`:
/// the arguments are `data_len / 8` u64s at `data` (at most [`MAX_VARARGS`]).
///
/// # Safety
/// A context helper: `hctx` is the calling run's context.
pub unsafe extern "C" fn trace_vprintk(
    fmt: u64,
    size: u64,
    data: u64,
    data_len: u64,
    _: u64,
    hctx: *mut HelperContext,
) -> u64 {
    // SAFETY: the caller's contract.
    let hctx = unsafe { &mut *hctx };
    let einval = -(libc::EINVAL as i64) as u64;
    let data_len = data_len as u32 as usize;
    if !data_len.is_multiple_of(8) || data_len / 8 > MAX_VARARGS || (data_len > 0 && data == 0) {
        return einval;
    }
    let args: Vec<u64> = match data_len {
        0 => Vec::new(),
        n => match read_bytes(hctx, data, n) {
            Some(b) => b
                .chunks_exact(8)
                .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
                .collect(),
            None => return einval,
        },
    };
    print(hctx, fmt, size as u32 as u64, &args)
}

/// Registers both helpers under their kernel ids.
pub(crate) fn register(h: &mut Helpers) {
    h.register_with_context(super::helpers::TRACE_PRINTK, trace_printk)
        .register_with_context(super::helpers::TRACE_VPRINTK, trace_vprintk);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(fmt: &str, args: &[u64]) -> Result<String, i64> {
        format(fmt.as_bytes(), args, &|a| {
            (a == 0x1000).then(|| b"str".to_vec())
        })
    }

    #[test]
    fn formats_like_the_kernel() {
        assert_eq!(f("n=%d\n", &[(-5i64) as u64]).unwrap(), "n=-5\n");
        assert_eq!(f("%d", &[0xffff_ffff]).unwrap(), "-1");
        assert_eq!(
            f("%u %lu", &[0x1_0000_0001, u64::MAX]).unwrap(),
            "1 18446744073709551615"
        );
        assert_eq!(
            f("%x %llx %08X", &[255, 1 << 40, 0xbeef]).unwrap(),
            "ff 10000000000 0000BEEF"
        );
        assert_eq!(
            f("[%5d|%-5d|%05d]", &[42, 42, (-42i64) as u64]).unwrap(),
            "[   42|42   |-0042]"
        );
        assert_eq!(f("%s!", &[0x1000]).unwrap(), "str!");
        assert_eq!(f("%c%c", &[b'o' as u64, b'k' as u64]).unwrap(), "ok");
        assert_eq!(f("100%%", &[]).unwrap(), "100%");
        assert_eq!(f("%#x %.3d", &[16, 7]).unwrap(), "0x10 007");
    }

    #[test]
    fn refuses_what_the_kernel_refuses() {
        let einval = Err(-(libc::EINVAL as i64));
        assert_eq!(f("%d %d", &[1]), einval, "too few arguments");
        assert_eq!(f("%q", &[1]), einval, "unknown conversion");
        assert_eq!(f("%s", &[0x2000]), einval, "unreadable string");
        assert_eq!(f("%pS", &[1]), einval, "unsupported pointer format");
        assert_eq!(f("%", &[1]), einval, "truncated");
    }
}
