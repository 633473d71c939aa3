// Moves the packet's edges: pushes a 4-byte tag in front of the Ethernet header (adjust_head),
// trims the last two bytes (adjust_tail), and records each helper's result in a hash map so
// that refused adjustments are visible too.
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 8);
	__type(key, __u32);
	__type(value, __s64);
} results SEC(".maps");

static __always_inline void record(__u32 key, __s64 value)
{
	bpf_map_update_elem(&results, &key, &value, BPF_ANY);
}

SEC("xdp")
int xdp_edges(struct xdp_md *ctx)
{
	void *data, *data_end;
	__u8 *tag;

	record(0, bpf_xdp_adjust_head(ctx, -4));
	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	tag = data;
	if ((void *)(tag + 4) > data_end)
		return XDP_ABORTED;
	tag[0] = 0xde;
	tag[1] = 0xad;
	tag[2] = 0xbe;
	tag[3] = 0xef;
	record(1, bpf_xdp_adjust_tail(ctx, -2));
	/* Far too much headroom asked for: -EINVAL, nothing moves. */
	record(2, bpf_xdp_adjust_head(ctx, -4096));
	/* Shrinking below ETH_HLEN: -EINVAL. */
	record(3, bpf_xdp_adjust_tail(ctx, -4000));
	record(4, (long)ctx->data_end - (long)ctx->data);
	return XDP_TX;
}

char LICENSE[] SEC("license") = "GPL";
