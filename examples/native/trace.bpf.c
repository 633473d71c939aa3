// Tracers for the `native` example: an fentry/fexit pair on the native function demo_hash,
// with a hash map of call counts per thread and a log2 latency histogram. Built by build.rs:
//   clang-19 -O2 -g -target bpf -I/usr/include/x86_64-linux-gnu -c trace.bpf.c -o trace.bpf.o
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

#define SLOTS 32

/* Calls seen by fentry, per thread (pid_tgid). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 64);
	__type(key, __u64);
	__type(value, __u64);
} calls SEC(".maps");

/* When the call in progress started, per thread. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 64);
	__type(key, __u64);
	__type(value, __u64);
} starts SEC(".maps");

/* Calls by duration: slot n counts durations in [2^n, 2^(n+1)) ns. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, SLOTS);
	__type(key, __u32);
	__type(value, __u64);
} latency_ns SEC(".maps");

/* [0]: fentry runs, [1]: fexit runs, [2]: results fexit found wrong. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 3);
	__type(key, __u32);
	__type(value, __u64);
} totals SEC(".maps");

static __always_inline void bump(void *map, __u32 key)
{
	__u64 *v = bpf_map_lookup_elem(map, &key);

	if (v)
		__sync_fetch_and_add(v, 1);
}

SEC("fentry/demo_hash")
int BPF_PROG(on_entry, long key, long seed)
{
	__u64 id = bpf_get_current_pid_tgid();
	__u64 now = bpf_ktime_get_ns();
	__u64 one = 1, *n;

	n = bpf_map_lookup_elem(&calls, &id);
	if (n)
		__sync_fetch_and_add(n, 1);
	else
		bpf_map_update_elem(&calls, &id, &one, BPF_NOEXIST);
	bpf_map_update_elem(&starts, &id, &now, BPF_ANY);
	bump(&totals, 0);
	return 0;
}

static __always_inline __u32 log2(__u64 v)
{
	__u32 n = 0;

	for (int i = 0; i < SLOTS - 1 && v > 1; i++) {
		v >>= 1;
		n++;
	}
	return n;
}

/* The same mix as demo_hash, to check the result the function returned. */
static __always_inline __u64 mix(__u64 key, __u64 seed)
{
	__u64 z = key + seed * 0x9e3779b97f4a7c15ull;

	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
	return z ^ (z >> 31);
}

SEC("fexit/demo_hash")
int BPF_PROG(on_exit, long key, long seed, long ret)
{
	__u64 id = bpf_get_current_pid_tgid();
	__u64 *start = bpf_map_lookup_elem(&starts, &id);
	__u32 slot;

	bump(&totals, 1);
	if ((__u64)ret != mix(key, seed))
		bump(&totals, 2);
	if (!start)
		return 0;
	slot = log2(bpf_ktime_get_ns() - *start);
	bump(&latency_ns, slot);
	bpf_map_delete_elem(&starts, &id);
	return 0;
}

char LICENSE[] SEC("license") = "GPL";
