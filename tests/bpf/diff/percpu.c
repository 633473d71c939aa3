// Per-CPU counters: a percpu_array of totals and a percpu_hash per UDP destination port whose
// 12-byte value is padded to 16 bytes per CPU in a lookup from user space.
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

struct totals {
	__u64 packets;
	__u64 bytes;
};

struct port_stat {
	__u32 packets;
	__u32 bytes;
	__u32 last_len;
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 2);
	__type(key, __u32);
	__type(value, struct totals);
} totals SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, 8);
	__type(key, __u16);
	__type(value, struct port_stat);
} by_port SEC(".maps");

SEC("xdp")
int percpu(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = (void *)(eth + 1);
	struct udphdr *udp = (void *)(ip + 1);
	__u32 len = data_end - data;
	// Slot 0 counts UDP packets, slot 1 all others.
	__u32 slot = 1;

	if ((void *)(udp + 1) <= data_end && eth->h_proto == bpf_htons(ETH_P_IP) &&
	    ip->ihl == 5 && ip->protocol == IPPROTO_UDP)
		slot = 0;
	struct totals *t = bpf_map_lookup_elem(&totals, &slot);
	if (!t)
		return XDP_ABORTED;
	t->packets++;
	t->bytes += len;
	if (slot)
		return XDP_PASS;
	// Checked again: the verifier forgets the first check through the slot spilled to the stack.
	if ((void *)(udp + 1) > data_end)
		return XDP_ABORTED;

	__u16 port = bpf_ntohs(udp->dest);
	struct port_stat *p = bpf_map_lookup_elem(&by_port, &port);
	if (p) {
		p->packets++;
		p->bytes += len;
		p->last_len = len;
		return XDP_TX;
	}
	struct port_stat fresh = { .packets = 1, .bytes = len, .last_len = len };
	return 100 - bpf_map_update_elem(&by_port, &port, &fresh, BPF_ANY);
}

char LICENSE[] SEC("license") = "GPL";
