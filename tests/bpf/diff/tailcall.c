// Tail calls through a prog_array initialised with .values: the first payload byte picks the
// slot (slot 3 is empty, 4 and beyond are out of range), and slot 2 is a program that tail-calls
// itself until the kernel's limit of 33 tail calls per run stops it.
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <bpf/bpf_helpers.h>

__u32 runs_a;
__u32 runs_b;
__u32 runs_chain;
__u32 chain_depth;

SEC("xdp")
int prog_a(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	__u8 *p = data;

	runs_a++;
	if ((void *)(p + 15) > data_end)
		return XDP_ABORTED;
	p[14] = 0xaa;
	return XDP_TX;
}

SEC("xdp")
int prog_b(struct xdp_md *ctx)
{
	runs_b++;
	return XDP_DROP;
}

SEC("xdp")
int chain(struct xdp_md *ctx);

struct {
	__uint(type, BPF_MAP_TYPE_PROG_ARRAY);
	__uint(max_entries, 4);
	__uint(key_size, sizeof(__u32));
	__array(values, int(void *));
} jumps SEC(".maps") = {
	.values = {
		[0] = (void *)&prog_a,
		[1] = (void *)&prog_b,
		[2] = (void *)&chain,
	},
};

SEC("xdp")
int chain(struct xdp_md *ctx)
{
	runs_chain++;
	chain_depth++;
	bpf_tail_call(ctx, &jumps, 2);
	// Reached when the tail call fails: the limit. chain_depth says how deep this run went.
	__u32 depth = chain_depth;
	chain_depth = 0;
	return 1000 + depth;
}

SEC("xdp")
int entry(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	__u8 *p = data;

	if ((void *)(p + 15) > data_end)
		return XDP_ABORTED;
	bpf_tail_call(ctx, &jumps, p[14]);
	return 900 + p[14];
}

char LICENSE[] SEC("license") = "GPL";
