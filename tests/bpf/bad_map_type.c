// A map type livebpf does not describe (BPF_MAP_TYPE_STACK_TRACE): refused, naming the map.
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

struct {
	__uint(type, BPF_MAP_TYPE_STACK_TRACE);
	__uint(max_entries, 16);
	__uint(key_size, sizeof(__u32));
	__uint(value_size, 8 * sizeof(__u64));
} stacks SEC(".maps");

SEC("xdp")
int uses_stacks(struct xdp_md *ctx)
{
	return bpf_get_stackid(ctx, &stacks, 0) < 0 ? XDP_PASS : XDP_DROP;
}

char LICENSE[] SEC("license") = "GPL";
