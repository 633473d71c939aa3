// One BTF map of each further supported kind, with pinning and flags.
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 8);
	__type(key, __u32);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} pinned_array SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} cpu_array SEC(".maps");

struct pair {
	__u64 a;
	__u32 b;
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, 64);
	__type(key, struct pair);
	__type(value, __u16);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} cpu_hash SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 1024);
	__type(key, __u64);
	__type(value, struct pair);
} lru SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 4096);
} events SEC(".maps");

SEC("xdp")
int use_maps(struct xdp_md *ctx)
{
	__u32 zero = 0;
	__u64 k = 1;
	struct pair p = { .a = 1, .b = 2 };
	__u64 *v = bpf_map_lookup_elem(&pinned_array, &zero);
	__u32 *c = bpf_map_lookup_elem(&cpu_array, &zero);
	__u16 *h = bpf_map_lookup_elem(&cpu_hash, &p);
	struct pair *l = bpf_map_lookup_elem(&lru, &k);
	__u64 *e = bpf_ringbuf_reserve(&events, 8, 0);

	if (e)
		bpf_ringbuf_submit(e, 0);
	return (v != 0) + (c != 0) + (h != 0) + (l != 0);
}

char LICENSE[] SEC("license") = "GPL";
