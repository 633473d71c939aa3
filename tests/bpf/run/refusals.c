// Programs livebpf must refuse at load time, each for one reason, while the object's other
// programs load.
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 4);
	__type(key, __u32);
	__type(value, __u64);
} arr SEC(".maps");

SEC("xdp")
int unknown_helper(struct xdp_md *ctx)
{
	char comm[16];

	bpf_get_current_comm(comm, sizeof(comm));
	return comm[0];
}

static long visit(void *map, __u32 *key, __u64 *value, void *ctx)
{
	return 0;
}

SEC("xdp")
int other_callback(struct xdp_md *ctx)
{
	return bpf_for_each_map_elem(&arr, visit, 0, 0);
}

SEC("tc")
int skb_reader(struct __sk_buff *skb)
{
	return skb->len;
}

SEC("xdp")
int fine(struct xdp_md *ctx)
{
	return XDP_PASS;
}

char LICENSE[] SEC("license") = "GPL";
