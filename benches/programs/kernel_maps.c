// Hash map operations per op inside the kernel, for benches/kernel.rs: each program runs
// LOOPS bpf_loop iterations over the keys that benches/maps.rs uses (k * 7919 % 1024 over a
// 1024-entry map, 4-byte keys, 8-byte values). `baseline` does the same loop without the map
// operation, so (program - baseline) / LOOPS is the cost of one operation.
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#define ENTRIES 1024
#define LOOPS 1024

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, ENTRIES);
	__type(key, __u32);
	__type(value, __u64);
} hash SEC(".maps");

struct loop_ctx {
	__u64 acc;
};

static __always_inline __u32 key_of(__u32 i)
{
	return i * 7919 % ENTRIES;
}

static int fill_one(__u32 i, struct loop_ctx *c)
{
	__u32 k = i;
	__u64 v = 1;

	c->acc += bpf_map_update_elem(&hash, &k, &v, BPF_ANY) == 0;
	return 0;
}

static int lookup_one(__u32 i, struct loop_ctx *c)
{
	__u32 k = key_of(i);

	c->acc += bpf_map_lookup_elem(&hash, &k) != 0;
	return 0;
}

static int update_one(__u32 i, struct loop_ctx *c)
{
	__u32 k = key_of(i);
	__u64 v = 42;

	c->acc += bpf_map_update_elem(&hash, &k, &v, BPF_EXIST) == 0;
	return 0;
}

static int baseline_one(__u32 i, struct loop_ctx *c)
{
	__u32 k = key_of(i);

	// The key goes through the stack as for the real operations.
	c->acc += *(volatile __u32 *)&k != ENTRIES;
	return 0;
}

// Each returns how many of its LOOPS operations succeeded (LOOPS: all of them).
SEC("xdp")
int fill(struct xdp_md *ctx)
{
	struct loop_ctx c = {};

	bpf_loop(ENTRIES, fill_one, &c, 0);
	return c.acc;
}

SEC("xdp")
int lookups(struct xdp_md *ctx)
{
	struct loop_ctx c = {};

	bpf_loop(LOOPS, lookup_one, &c, 0);
	return c.acc;
}

SEC("xdp")
int updates(struct xdp_md *ctx)
{
	struct loop_ctx c = {};

	bpf_loop(LOOPS, update_one, &c, 0);
	return c.acc;
}

SEC("xdp")
int baseline(struct xdp_md *ctx)
{
	struct loop_ctx c = {};

	bpf_loop(LOOPS, baseline_one, &c, 0);
	return c.acc;
}

char LICENSE[] SEC("license") = "GPL";
