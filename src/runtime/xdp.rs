//! XDP: the context a program sees, the packet frame, and the helpers that move the packet's
//! edges — as the kernel's `BPF_PROG_TEST_RUN` sets them up (`net/bpf/test_run.c`), so that a
//! program gives the same result here as there.
//!
//! A program reads `struct xdp_md`, whose fields are 32-bit offsets in the UAPI; the kernel's
//! context conversion turns each field load into a load of the real pointer in its `xdp_buff`.
//! livebpf does the same (`convert_access`): the program's `r1` points at an [`XdpContext`]
//! and each `ldxw` of an `xdp_md` field becomes a load of the matching field here.
//!
//! The frame is one page, laid out as the kernel's test run lays it out: [`XDP_PACKET_HEADROOM`]
//! bytes of headroom, the packet, and tailroom of which the last [`SKB_SHARED_INFO_SIZE`] bytes
//! are never part of the packet. `bpf_xdp_adjust_head` may move `data` down to
//! `data_hard_start + XDP_FRAME_SIZE` (room for the kernel's `struct xdp_frame`), and
//! `bpf_xdp_adjust_tail` may grow the packet up to the frame's end less the shared info.

use crate::exec::HelperContext;
use crate::isa::{Insn, Size};

/// `XDP_PACKET_HEADROOM`: headroom before the packet.
pub const XDP_PACKET_HEADROOM: usize = 256;
/// The frame size of a test run (`PAGE_SIZE`).
pub const FRAME_SIZE: usize = 4096;
/// `SKB_DATA_ALIGN(sizeof(struct skb_shared_info))` on x86-64 with 64-byte cache lines: the
/// tailroom a packet can never grow into.
pub const SKB_SHARED_INFO_SIZE: usize = 320;
/// `sizeof(struct xdp_frame)`: headroom `bpf_xdp_adjust_head` must leave.
pub const XDP_FRAME_SIZE: usize = 40;
/// `ETH_HLEN`: the shortest packet (input and after an adjustment).
pub const ETH_HLEN: usize = 14;
/// The longest packet a run accepts (the kernel's `max_data_sz` without fragments).
pub const MAX_PACKET: usize = FRAME_SIZE - XDP_PACKET_HEADROOM - SKB_SHARED_INFO_SIZE;
/// The most metadata `bpf_xdp_adjust_meta` allows.
const MAX_META: usize = 32;
/// The loopback device's ifindex: a test run's packets arrive on it.
pub const LOOPBACK_IFINDEX: u32 = 1;

/// `BPF_FUNC_xdp_adjust_head`.
pub const XDP_ADJUST_HEAD: u32 = 44;
/// `BPF_FUNC_xdp_adjust_meta`.
pub const XDP_ADJUST_META: u32 = 54;
/// `BPF_FUNC_xdp_adjust_tail`.
pub const XDP_ADJUST_TAIL: u32 = 65;

/// What an XDP program's `r1` points at: the kernel's `xdp_buff`, reduced to what programs and
/// helpers use. Programs only read it (the conversion refuses stores); helpers move its edges.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct XdpContext {
    /// First byte of the packet.
    pub data: u64,
    /// One past the last byte of the packet.
    pub data_end: u64,
    /// First byte of the metadata before the packet (`data` when there is none).
    pub data_meta: u64,
    /// `xdp_md.ingress_ifindex`.
    pub ingress_ifindex: u32,
    /// `xdp_md.rx_queue_index`.
    pub rx_queue_index: u32,
    /// Start of the frame (the kernel's `data_hard_start`).
    pub hard_start: u64,
    /// End of the frame.
    pub frame_end: u64,
}

/// Field offsets of `struct xdp_md` (UAPI) and of [`XdpContext`].
const MD_DATA: i16 = 0;
const MD_DATA_END: i16 = 4;
const MD_DATA_META: i16 = 8;
const MD_INGRESS_IFINDEX: i16 = 12;
const MD_RX_QUEUE_INDEX: i16 = 16;
const MD_EGRESS_IFINDEX: i16 = 20;

/// The load of `XdpContext` that replaces a load of an `xdp_md` field, or why it is refused
/// (the kernel's `xdp_is_valid_access` and `xdp_convert_ctx_access`).
pub(crate) fn convert_access(insn: Insn) -> Result<Insn, String> {
    use std::mem::offset_of;
    let Insn::Load {
        size,
        signed,
        dst,
        base,
        off,
    } = insn
    else {
        return Err("the XDP context (struct xdp_md) is read-only".into());
    };
    if size != Size::W || signed {
        return Err(format!(
            "a {}-byte{} load from the XDP context at offset {off}; struct xdp_md fields are read with 4-byte loads",
            size.bytes(),
            if signed { " sign-extending" } else { "" }
        ));
    }
    let (size, field) = match off {
        MD_DATA => (Size::DW, offset_of!(XdpContext, data)),
        MD_DATA_END => (Size::DW, offset_of!(XdpContext, data_end)),
        MD_DATA_META => (Size::DW, offset_of!(XdpContext, data_meta)),
        MD_INGRESS_IFINDEX => (Size::W, offset_of!(XdpContext, ingress_ifindex)),
        MD_RX_QUEUE_INDEX => (Size::W, offset_of!(XdpContext, rx_queue_index)),
        MD_EGRESS_IFINDEX => {
            return Err(
                "xdp_md.egress_ifindex is only readable by devmap programs, which livebpf does not run".into(),
            );
        }
        _ => return Err(format!("offset {off} is not a field of struct xdp_md")),
    };
    Ok(Insn::Load {
        size,
        signed: false,
        dst,
        base,
        off: field as i16,
    })
}

/// One packet's frame: a page with the packet at [`XDP_PACKET_HEADROOM`], and its context.
///
/// Both live in heap memory that no Rust reference covers while a program runs: the program and
/// the helpers reach them through raw addresses.
pub struct XdpFrame {
    /// The page (u64s: 8-byte aligned, as the kernel's page is).
    page: *mut [u64; FRAME_SIZE / 8],
    ctx: *mut XdpContext,
}

// SAFETY: the frame owns its two allocations; nothing else points into them once a run ended.
unsafe impl Send for XdpFrame {}

impl Drop for XdpFrame {
    fn drop(&mut self) {
        // SAFETY: both came from `Box::into_raw` in `new` and are freed once, here.
        unsafe {
            drop(Box::from_raw(self.page));
            drop(Box::from_raw(self.ctx));
        }
    }
}

/// A packet a run cannot take.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "a packet of {len} bytes: XDP packets are {ETH_HLEN} to {MAX_PACKET} bytes (the kernel's test run refuses others too)"
)]
pub struct PacketSizeError {
    /// The packet's length.
    pub len: usize,
}

impl XdpFrame {
    /// A frame holding `packet`, with the context a kernel test run gives: received on the
    /// loopback device, queue 0, no metadata.
    pub fn new(packet: &[u8]) -> Result<XdpFrame, PacketSizeError> {
        if !(ETH_HLEN..=MAX_PACKET).contains(&packet.len()) {
            return Err(PacketSizeError { len: packet.len() });
        }
        let page = Box::into_raw(Box::new([0u64; FRAME_SIZE / 8]));
        let start = page as u64;
        let data = start + XDP_PACKET_HEADROOM as u64;
        // SAFETY: the page is FRAME_SIZE bytes and the packet fits after the headroom.
        unsafe {
            std::ptr::copy_nonoverlapping(packet.as_ptr(), data as *mut u8, packet.len());
        }
        let ctx = Box::into_raw(Box::new(XdpContext {
            data,
            data_end: data + packet.len() as u64,
            data_meta: data,
            ingress_ifindex: LOOPBACK_IFINDEX,
            rx_queue_index: 0,
            hard_start: start,
            frame_end: start + FRAME_SIZE as u64,
        }));
        Ok(XdpFrame { page, ctx })
    }

    /// The context's address: the program's r1.
    pub fn ctx_addr(&self) -> u64 {
        self.ctx as u64
    }

    /// The context region (read-only for programs) and the frame (writable).
    pub(crate) fn regions(&self) -> [crate::exec::MemRegion; 2] {
        use crate::exec::MemRegion;
        [
            MemRegion::new(
                self.ctx as u64,
                std::mem::size_of::<XdpContext>() as u64,
                false,
            ),
            MemRegion::new(self.page as u64, FRAME_SIZE as u64, true),
        ]
    }

    /// The packet now (between `data` and `data_end`).
    pub fn packet(&self) -> Vec<u8> {
        // SAFETY: no run is in progress (the frame is borrowed), and the helpers keep
        // data <= data_end inside the page.
        unsafe {
            let ctx = &*self.ctx;
            std::slice::from_raw_parts(ctx.data as *const u8, (ctx.data_end - ctx.data) as usize)
                .to_vec()
        }
    }
}

/// The XDP context of the run `hctx` belongs to, if `ctx` (the helper's r1) is it.
///
/// # Safety
/// As for [`super::run_state`].
unsafe fn context<'a>(hctx: *mut HelperContext, ctx: u64) -> Option<&'a mut XdpContext> {
    // SAFETY: forwarded.
    let state = unsafe { super::run_state(hctx) }?;
    if state.xdp.is_null() || state.xdp as u64 != ctx {
        return None;
    }
    // SAFETY: the run's context lives in its frame for the whole run, and the program only
    // reads it (the conversion refuses stores), so the helper may change it.
    Some(unsafe { &mut *state.xdp })
}

/// `long bpf_xdp_adjust_head(struct xdp_md *ctx, int delta)`.
///
/// # Safety
/// A context helper: `hctx` is the calling run's context, and its user pointer is null or
/// the state the runtime gives the runs it starts (true of runs from [`super::LoadedProgram`]).
pub unsafe extern "C" fn xdp_adjust_head(
    ctx: u64,
    delta: u64,
    _: u64,
    _: u64,
    _: u64,
    hctx: *mut HelperContext,
) -> u64 {
    // SAFETY: forwarded.
    let Some(c) = (unsafe { context(hctx, ctx) }) else {
        return -(libc::EINVAL as i64) as u64;
    };
    let delta = delta as i32 as i64;
    let metalen = c.data - c.data_meta;
    let data = c.data as i64 + delta;
    let data_start = (c.hard_start + XDP_FRAME_SIZE as u64 + metalen) as i64;
    if data < data_start || data > c.data_end as i64 - ETH_HLEN as i64 {
        return -(libc::EINVAL as i64) as u64;
    }
    if metalen != 0 {
        // SAFETY: both ranges lie in the frame (data_start bounds the new meta from below).
        unsafe {
            std::ptr::copy(
                c.data_meta as *const u8,
                (c.data_meta as i64 + delta) as *mut u8,
                metalen as usize,
            )
        };
    }
    c.data_meta = (c.data_meta as i64 + delta) as u64;
    c.data = data as u64;
    0
}

/// `long bpf_xdp_adjust_tail(struct xdp_md *ctx, int delta)`.
///
/// # Safety
/// A context helper: `hctx` is the calling run's context, and its user pointer is null or
/// the state the runtime gives the runs it starts (true of runs from [`super::LoadedProgram`]).
pub unsafe extern "C" fn xdp_adjust_tail(
    ctx: u64,
    delta: u64,
    _: u64,
    _: u64,
    _: u64,
    hctx: *mut HelperContext,
) -> u64 {
    // SAFETY: forwarded.
    let Some(c) = (unsafe { context(hctx, ctx) }) else {
        return -(libc::EINVAL as i64) as u64;
    };
    let delta = delta as i32 as i64;
    let hard_end = (c.frame_end - SKB_SHARED_INFO_SIZE as u64) as i64;
    let data_end = c.data_end as i64 + delta;
    if data_end > hard_end || data_end < c.data as i64 + ETH_HLEN as i64 {
        return -(libc::EINVAL as i64) as u64;
    }
    if delta > 0 {
        // SAFETY: [data_end, data_end + delta) is inside the frame (checked above).
        unsafe { std::ptr::write_bytes(c.data_end as *mut u8, 0, delta as usize) };
    }
    c.data_end = data_end as u64;
    0
}

/// `long bpf_xdp_adjust_meta(struct xdp_md *ctx, int delta)`.
///
/// # Safety
/// A context helper: `hctx` is the calling run's context, and its user pointer is null or
/// the state the runtime gives the runs it starts (true of runs from [`super::LoadedProgram`]).
pub unsafe extern "C" fn xdp_adjust_meta(
    ctx: u64,
    delta: u64,
    _: u64,
    _: u64,
    _: u64,
    hctx: *mut HelperContext,
) -> u64 {
    // SAFETY: forwarded.
    let Some(c) = (unsafe { context(hctx, ctx) }) else {
        return -(libc::EINVAL as i64) as u64;
    };
    let meta = c.data_meta as i64 + delta as i32 as i64;
    let frame_end = (c.hard_start + XDP_FRAME_SIZE as u64) as i64;
    if meta < frame_end || meta > c.data as i64 {
        return -(libc::EINVAL as i64) as u64;
    }
    let metalen = (c.data as i64 - meta) as usize;
    if metalen > MAX_META || !metalen.is_multiple_of(4) {
        return -(libc::EACCES as i64) as u64;
    }
    c.data_meta = meta as u64;
    0
}
