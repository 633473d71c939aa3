// An LRU hash counting packets per UDP source port: a hit refreshes the entry, a new port
// inserts (evicting when the map is full). The return value says which happened.
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 4);
	__type(key, __u16);
	__type(value, __u64);
} recent SEC(".maps");

SEC("xdp")
int lru(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = (void *)(eth + 1);
	struct udphdr *udp = (void *)(ip + 1);

	if ((void *)(udp + 1) > data_end || eth->h_proto != bpf_htons(ETH_P_IP) ||
	    ip->ihl != 5 || ip->protocol != IPPROTO_UDP)
		return XDP_PASS;
	__u16 port = bpf_ntohs(udp->source);
	__u64 *n = bpf_map_lookup_elem(&recent, &port);
	if (n) {
		(*n)++;
		return XDP_TX;
	}
	__u64 one = 1;
	return 100 - bpf_map_update_elem(&recent, &port, &one, BPF_NOEXIST);
}

char LICENSE[] SEC("license") = "GPL";
