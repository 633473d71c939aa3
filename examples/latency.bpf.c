// Measures the latency of an XDP program while threads run it: an fentry program records
// when each run starts, an fexit program adds the run's duration to a log2 histogram. With
// livebpf the tracers attach to the JIT-compiled target while it runs, and detach again:
//   clang-19 -O2 -g -target bpf -I/usr/include/x86_64-linux-gnu -c examples/latency.bpf.c -o latency.o
//   livebpf trace latency.o:checksum --fentry latency.o:on_entry --fexit latency.o:on_exit \
//       --packet HEX --threads 4 --cycles 100
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

#define SLOTS 32

/* Start time of the run in progress, per thread. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u64);
	__type(value, __u64);
} starts SEC(".maps");

/* Runs by duration: slot n counts durations in [2^n, 2^(n+1)) nanoseconds. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, SLOTS);
	__type(key, __u32);
	__type(value, __u64);
} latency_ns SEC(".maps");

/* Runs by the verdict the target returned (XDP_PASS = 2, XDP_TX = 3, …). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 8);
	__type(key, __u32);
	__type(value, __u64);
} verdicts SEC(".maps");

/* The traced program: a byte sum over the packet; its parity picks the verdict. */
SEC("xdp")
int checksum(struct xdp_md *ctx)
{
	__u8 *data = (void *)(long)ctx->data;
	__u8 *data_end = (void *)(long)ctx->data_end;
	__u32 sum = 0;

	for (int i = 0; i < 1500; i++) {
		if (data + i + 1 > data_end)
			break;
		sum += data[i];
	}
	return sum & 1 ? XDP_PASS : XDP_TX;
}

SEC("fentry/checksum")
int BPF_PROG(on_entry, struct xdp_md *xdp)
{
	__u64 id = bpf_get_current_pid_tgid();
	__u64 now = bpf_ktime_get_ns();

	bpf_map_update_elem(&starts, &id, &now, BPF_ANY);
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

SEC("fexit/checksum")
int BPF_PROG(on_exit, struct xdp_md *xdp, int verdict)
{
	__u64 id = bpf_get_current_pid_tgid();
	__u64 *start = bpf_map_lookup_elem(&starts, &id);
	__u32 slot, v = verdict;
	__u64 *count;

	count = bpf_map_lookup_elem(&verdicts, &v);
	if (count)
		__sync_fetch_and_add(count, 1);
	if (!start)
		return 0;
	slot = log2(bpf_ktime_get_ns() - *start);
	count = bpf_map_lookup_elem(&latency_ns, &slot);
	if (count)
		__sync_fetch_and_add(count, 1);
	bpf_map_delete_elem(&starts, &id);
	return 0;
}

char LICENSE[] SEC("license") = "GPL";
