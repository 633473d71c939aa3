// Head and tail adjustment: an 802.1Q tag is popped (the MAC addresses move in by four bytes),
// an untagged IPv4 frame gets tag 100 pushed, and frames longer than 60 bytes are trimmed to 60.
// EtherType 0x88b5 asks for a trim to below the Ethernet header, which the helper refuses; so
// is a pop that would leave less than an Ethernet header. The helpers' results go to .bss.
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

long head_ret;
long tail_ret;
__u32 pushed;
__u32 popped;
__u32 trimmed;

#define TRIM_TO 60

SEC("xdp")
int adjust(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	__u8 *p = data;
	__u8 macs[12];

	if ((void *)(p + 14) > data_end)
		return XDP_ABORTED;
	__u16 proto = bpf_ntohs(*(__be16 *)(p + 12));

	if (proto == ETH_P_8021Q) {
		__builtin_memcpy(macs, p, 12);
		head_ret = bpf_xdp_adjust_head(ctx, 4);
		if (head_ret)
			return XDP_ABORTED;
		data = (void *)(long)ctx->data;
		data_end = (void *)(long)ctx->data_end;
		p = data;
		if ((void *)(p + 12) > data_end)
			return XDP_ABORTED;
		__builtin_memcpy(p, macs, 12);
		popped++;
	} else if (proto == ETH_P_IP) {
		__builtin_memcpy(macs, p, 12);
		head_ret = bpf_xdp_adjust_head(ctx, -4);
		if (head_ret)
			return XDP_ABORTED;
		data = (void *)(long)ctx->data;
		data_end = (void *)(long)ctx->data_end;
		p = data;
		if ((void *)(p + 16) > data_end)
			return XDP_ABORTED;
		__builtin_memcpy(p, macs, 12);
		*(__be16 *)(p + 12) = bpf_htons(ETH_P_8021Q);
		*(__be16 *)(p + 14) = bpf_htons(100);
		pushed++;
	} else if (proto == 0x88b5) {
		tail_ret = bpf_xdp_adjust_tail(ctx, -(int)(data_end - data));
		return tail_ret ? XDP_DROP : XDP_ABORTED;
	}

	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	long len = data_end - data;
	if (len > TRIM_TO) {
		tail_ret = bpf_xdp_adjust_tail(ctx, TRIM_TO - len);
		if (tail_ret)
			return XDP_ABORTED;
		trimmed++;
	}
	return XDP_TX;
}

char LICENSE[] SEC("license") = "GPL";
