// A static subprogram called from two programs, which calls another in turn, and a bpf_loop
// callback (an lddw of a function address, BPF_PSEUDO_FUNC once linked).
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

static __noinline int twice(int x)
{
	return x + x;
}

static __noinline int square_plus_one(int x)
{
	return twice(x * x) + 1;
}

static int add_index(__u32 index, void *ctx)
{
	__u64 *sum = ctx;

	*sum += index;
	return 0;
}

SEC("xdp")
int xdp_loop(struct xdp_md *ctx)
{
	__u64 sum = ctx->rx_queue_index;

	bpf_loop(10, add_index, &sum, 0);
	return square_plus_one((int)sum) & 3;
}

SEC("tc")
int tc_square(struct __sk_buff *skb)
{
	return square_plus_one(skb->len);
}

char LICENSE[] SEC("license") = "GPL";
