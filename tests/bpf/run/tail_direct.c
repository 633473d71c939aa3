// Tail calls through a statically initialised program array: `constant` always jumps to slot 1
// (a constant map and index: a direct jump in x86-64 JIT code), `computed` to the slot the
// packet's first byte names; both fall through on an empty slot.
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

SEC("xdp")
int to_pass(struct xdp_md *ctx)
{
	return XDP_PASS;
}

SEC("xdp")
int to_tx(struct xdp_md *ctx)
{
	return XDP_TX;
}

struct {
	__uint(type, BPF_MAP_TYPE_PROG_ARRAY);
	__uint(max_entries, 4);
	__uint(key_size, sizeof(__u32));
	__array(values, int(void *));
} slots SEC(".maps") = {
	.values = {
		[1] = (void *)&to_tx,
		[2] = (void *)&to_pass,
	},
};

SEC("xdp")
int constant(struct xdp_md *ctx)
{
	bpf_tail_call(ctx, &slots, 1);
	return XDP_ABORTED;
}

SEC("xdp")
int computed(struct xdp_md *ctx)
{
	__u8 *data = (void *)(long)ctx->data;

	if ((void *)(data + 1) > (void *)(long)ctx->data_end)
		return XDP_DROP;
	bpf_tail_call(ctx, &slots, data[0] & 3);
	return XDP_ABORTED;
}

char LICENSE[] SEC("license") = "GPL";
