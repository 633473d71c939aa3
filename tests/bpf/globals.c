// Global data: .rodata (const volatile and const), .data, .bss, and the string literal of a
// bpf_trace_printk call in .rodata.str1.1, plus bpf_printk, whose format is a .rodata array.
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

const volatile __u32 threshold = 42;
const char banner[8] = "livebpf";
__u64 packets = 7;
__u32 counters[4];

SEC("xdp")
int xdp_globals(struct xdp_md *ctx)
{
	packets++;
	counters[ctx->ingress_ifindex & 3]++;
	bpf_printk("threshold %u packets %llu", threshold, packets);
	bpf_trace_printk("literal\n", sizeof("literal\n"));
	return threshold > banner[0] ? XDP_PASS : XDP_DROP;
}

char LICENSE[] SEC("license") = "Dual MIT/GPL";
