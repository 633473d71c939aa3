// The helpers whose results differ between runs (time, random numbers, the CPU number, trace
// output) used so that none of those values reaches the output, and the ring buffer, which the
// output does not show, except for its fixed size.
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <bpf/bpf_helpers.h>

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 4096);
} events SEC(".maps");

// A random key is inserted and deleted again: the map ends empty.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4);
	__type(key, __u32);
	__type(value, __u32);
} scratch SEC(".maps");

struct event {
	__u64 len;
	__u64 time;
};

__u64 ring_size;
__u32 outputs_ok;
__u32 reserved;
__u32 scratch_ok;
__u32 clock_ok;
__u32 cpu_ok;

SEC("xdp")
int helpers(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	__u64 t0 = bpf_ktime_get_ns();
	struct event ev = { .len = data_end - data, .time = t0 };

	if (bpf_ringbuf_output(&events, &ev, sizeof(ev), 0) == 0)
		outputs_ok++;
	struct event *e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	if (e) {
		reserved++;
		e->len = ev.len;
		e->time = t0;
		// Odd lengths are discarded, even ones submitted.
		if (ev.len & 1)
			bpf_ringbuf_discard(e, 0);
		else
			bpf_ringbuf_submit(e, 0);
	}
	ring_size = bpf_ringbuf_query(&events, BPF_RB_RING_SIZE);

	__u32 key = bpf_get_prandom_u32(), one = 1;
	if (bpf_map_update_elem(&scratch, &key, &one, BPF_NOEXIST) == 0 &&
	    bpf_map_delete_elem(&scratch, &key) == 0)
		scratch_ok++;

	if (bpf_get_smp_processor_id() < 1 << 16)
		cpu_ok++;
	bpf_printk("helpers: %u bytes", ev.len);
	// A clock that is monotonic over this run.
	if (bpf_ktime_get_ns() >= t0)
		clock_ok++;
	return XDP_PASS;
}

char LICENSE[] SEC("license") = "GPL";
