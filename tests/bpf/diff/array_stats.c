// Array map statistics per IPv4 protocol number: slots 1..31 count their protocol, slot 0
// counts protocols past the array (whose lookup returns NULL). Packets with TOS 1 and 2 also
// try an update with BPF_NOEXIST and a delete, which arrays refuse: the return value carries
// the error.
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

struct stat {
	__u64 packets;
	__u64 bytes;
	__u32 min_len;
	__u32 max_len;
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 32);
	__type(key, __u32);
	__type(value, struct stat);
} stats SEC(".maps");

SEC("xdp")
int array_stats(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = (void *)(eth + 1);

	if ((void *)(ip + 1) > data_end || eth->h_proto != bpf_htons(ETH_P_IP))
		return XDP_PASS;
	__u32 key = ip->protocol;
	__u32 len = data_end - data;
	struct stat *s = bpf_map_lookup_elem(&stats, &key);

	if (!s) {
		key = 0;
		s = bpf_map_lookup_elem(&stats, &key);
		if (!s)
			return XDP_ABORTED;
	}
	s->packets++;
	s->bytes += len;
	if (!s->min_len || len < s->min_len)
		s->min_len = len;
	if (len > s->max_len)
		s->max_len = len;

	if (ip->tos == 1) {
		struct stat fresh = {};
		return 100 - bpf_map_update_elem(&stats, &key, &fresh, BPF_NOEXIST);
	}
	if (ip->tos == 2)
		return 100 - bpf_map_delete_elem(&stats, &key);
	return XDP_PASS;
}

char LICENSE[] SEC("license") = "GPL";
