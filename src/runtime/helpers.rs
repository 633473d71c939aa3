//! The kernel helpers a loaded program may call, by id, with Linux's semantics: the map and ring
//! buffer helpers of [`crate::maps::helpers`], the XDP helpers of [`super::xdp`], and the
//! general ones here (time, randomness, the current task, `bpf_trace_printk`).
//!
//! `bpf_loop` (181) never reaches a helper: the load step inlines it (`runtime/rewrite.rs`).
//! `bpf_tail_call` (12) is run by the engines themselves.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::exec::HelperContext;
use crate::helpers::Helpers;
use crate::loader::ProgType;
use crate::maps::helpers as mh;

use super::xdp;

/// `BPF_FUNC_ktime_get_ns`.
pub const KTIME_GET_NS: u32 = 5;
/// `BPF_FUNC_trace_printk`.
pub const TRACE_PRINTK: u32 = 6;
/// `BPF_FUNC_get_prandom_u32`.
pub const GET_PRANDOM_U32: u32 = 7;
/// `BPF_FUNC_tail_call`.
pub const TAIL_CALL: u32 = 12;
/// `BPF_FUNC_get_current_pid_tgid`.
pub const GET_CURRENT_PID_TGID: u32 = 14;
/// `BPF_FUNC_ktime_get_boot_ns`.
pub const KTIME_GET_BOOT_NS: u32 = 125;
/// `BPF_FUNC_ktime_get_coarse_ns`.
pub const KTIME_GET_COARSE_NS: u32 = 160;
/// `BPF_FUNC_get_func_ip`.
pub const GET_FUNC_IP: u32 = 173;
/// `BPF_FUNC_get_attach_cookie`.
pub const GET_ATTACH_COOKIE: u32 = 174;
/// `BPF_FUNC_trace_vprintk`.
pub const TRACE_VPRINTK: u32 = 177;
/// `BPF_FUNC_loop`.
pub const LOOP: u32 = super::rewrite::BPF_LOOP;

/// The kernel's name of a helper id livebpf knows (for messages), without the `bpf_` prefix.
pub fn name(id: u32) -> Option<&'static str> {
    Some(match id {
        mh::MAP_LOOKUP_ELEM => "map_lookup_elem",
        mh::MAP_UPDATE_ELEM => "map_update_elem",
        mh::MAP_DELETE_ELEM => "map_delete_elem",
        4 => "probe_read",
        KTIME_GET_NS => "ktime_get_ns",
        TRACE_PRINTK => "trace_printk",
        GET_PRANDOM_U32 => "get_prandom_u32",
        mh::GET_SMP_PROCESSOR_ID => "get_smp_processor_id",
        9 => "skb_store_bytes",
        10 => "l3_csum_replace",
        11 => "l4_csum_replace",
        TAIL_CALL => "tail_call",
        13 => "clone_redirect",
        GET_CURRENT_PID_TGID => "get_current_pid_tgid",
        15 => "get_current_uid_gid",
        16 => "get_current_comm",
        23 => "redirect",
        25 => "perf_event_output",
        26 => "skb_load_bytes",
        28 => "csum_diff",
        xdp::XDP_ADJUST_HEAD => "xdp_adjust_head",
        51 => "redirect_map",
        xdp::XDP_ADJUST_META => "xdp_adjust_meta",
        xdp::XDP_ADJUST_TAIL => "xdp_adjust_tail",
        112 => "probe_read_user",
        113 => "probe_read_kernel",
        KTIME_GET_BOOT_NS => "ktime_get_boot_ns",
        mh::RINGBUF_OUTPUT => "ringbuf_output",
        mh::RINGBUF_RESERVE => "ringbuf_reserve",
        mh::RINGBUF_SUBMIT => "ringbuf_submit",
        mh::RINGBUF_DISCARD => "ringbuf_discard",
        mh::RINGBUF_QUERY => "ringbuf_query",
        KTIME_GET_COARSE_NS => "ktime_get_coarse_ns",
        164 => "for_each_map_elem",
        165 => "snprintf",
        GET_FUNC_IP => "get_func_ip",
        GET_ATTACH_COOKIE => "get_attach_cookie",
        TRACE_VPRINTK => "trace_vprintk",
        LOOP => "loop",
        mh::MAP_LOOKUP_PERCPU_ELEM => "map_lookup_percpu_elem",
        _ => return None,
    })
}

fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write; the clock ids used are always available.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// `u64 bpf_ktime_get_ns(void)`: `CLOCK_MONOTONIC`, as the kernel's.
pub extern "C" fn ktime_get_ns(_: u64, _: u64, _: u64, _: u64, _: u64) -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC)
}

/// `u64 bpf_ktime_get_boot_ns(void)`: `CLOCK_BOOTTIME`.
pub extern "C" fn ktime_get_boot_ns(_: u64, _: u64, _: u64, _: u64, _: u64) -> u64 {
    clock_ns(libc::CLOCK_BOOTTIME)
}

/// `u64 bpf_ktime_get_coarse_ns(void)`: `CLOCK_MONOTONIC_COARSE`.
pub extern "C" fn ktime_get_coarse_ns(_: u64, _: u64, _: u64, _: u64, _: u64) -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC_COARSE)
}

/// `u32 bpf_get_prandom_u32(void)`: a per-thread xorshift generator (the kernel's is a
/// per-CPU one; neither is for cryptography), seeded from a global counter and the clock.
pub extern "C" fn get_prandom_u32(_: u64, _: u64, _: u64, _: u64, _: u64) -> u64 {
    use std::cell::Cell;
    static SEED: AtomicU64 = AtomicU64::new(0x9e37_79b9_7f4a_7c15);
    thread_local! {
        static STATE: Cell<u64> = const { Cell::new(0) };
    }
    STATE.with(|s| {
        let mut x = s.get();
        if x == 0 {
            x = SEED.fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed)
                ^ clock_ns(libc::CLOCK_MONOTONIC)
                | 1;
        }
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.set(x);
        (x >> 32) & 0xffff_ffff
    })
}

/// `u64 bpf_get_current_pid_tgid(void)`: the thread group id (the process id) in the upper
/// half, the thread id in the lower, as the kernel reports the current task.
pub extern "C" fn get_current_pid_tgid(_: u64, _: u64, _: u64, _: u64, _: u64) -> u64 {
    let tgid = std::process::id() as u64;
    let tid = rustix::thread::gettid().as_raw_nonzero().get() as u64;
    tgid << 32 | tid
}

/// `u64 bpf_get_attach_cookie(void *ctx)`: the cookie the tracer's link was attached with.
///
/// # Safety
/// A context helper: `hctx` is the calling run's context.
pub unsafe extern "C" fn get_attach_cookie(
    _: u64,
    _: u64,
    _: u64,
    _: u64,
    _: u64,
    hctx: *mut HelperContext,
) -> u64 {
    // SAFETY: the caller's contract.
    unsafe { (*hctx).attach_cookie() }
}

/// `u64 bpf_get_func_ip(void *ctx)`: the traced program's entry address.
///
/// # Safety
/// A context helper: `hctx` is the calling run's context.
pub unsafe extern "C" fn get_func_ip(
    _: u64,
    _: u64,
    _: u64,
    _: u64,
    _: u64,
    hctx: *mut HelperContext,
) -> u64 {
    // SAFETY: the caller's contract.
    unsafe { (*hctx).func_ip() }
}

/// Every helper a program of type `prog_type` may call (the kernel's `get_func_proto` for it,
/// restricted to what livebpf implements).
pub(crate) fn for_type(prog_type: &ProgType) -> Helpers {
    let mut h = Helpers::new();
    mh::register(&mut h);
    h.register_tail_call();
    h.register(KTIME_GET_NS, ktime_get_ns)
        .register(KTIME_GET_BOOT_NS, ktime_get_boot_ns)
        .register(KTIME_GET_COARSE_NS, ktime_get_coarse_ns)
        .register(GET_PRANDOM_U32, get_prandom_u32);
    super::printk::register(&mut h);
    match prog_type {
        ProgType::Xdp => {
            h.register_with_context(xdp::XDP_ADJUST_HEAD, xdp::xdp_adjust_head)
                .register_with_context(xdp::XDP_ADJUST_TAIL, xdp::xdp_adjust_tail)
                .register_with_context(xdp::XDP_ADJUST_META, xdp::xdp_adjust_meta);
        }
        ProgType::Fentry { .. } | ProgType::Fexit { .. } | ProgType::FmodRet { .. } => {
            h.register(GET_CURRENT_PID_TGID, get_current_pid_tgid)
                .register_with_context(GET_ATTACH_COOKIE, get_attach_cookie)
                .register_with_context(GET_FUNC_IP, get_func_ip);
        }
        ProgType::Freplace { .. } | ProgType::Raw => {
            h.register(GET_CURRENT_PID_TGID, get_current_pid_tgid);
        }
        ProgType::SocketFilter | ProgType::SchedCls => {}
    }
    h
}
