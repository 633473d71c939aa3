// A hash map counting packets and bytes per IPv4 source address, small enough to fill: the
// insert that does not fit returns the update's error, as does deleting an absent entry (a
// packet with TOS 0xff deletes its source's entry). The return value carries those errors.
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

struct counts {
	__u64 packets;
	__u64 bytes;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4);
	__type(key, __u32);
	__type(value, struct counts);
} by_src SEC(".maps");

// Errors come back as 100 + errno, so they differ from the XDP actions.
#define ERR(e) (100 - (e))

SEC("xdp")
int hash_count(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = (void *)(eth + 1);

	if ((void *)(ip + 1) > data_end || eth->h_proto != bpf_htons(ETH_P_IP))
		return XDP_PASS;
	__u32 key = ip->saddr;
	__u64 len = data_end - data;

	if (ip->tos == 0xff) {
		long err = bpf_map_delete_elem(&by_src, &key);
		return err ? ERR(err) : XDP_DROP;
	}
	struct counts *c = bpf_map_lookup_elem(&by_src, &key);
	if (c) {
		__sync_fetch_and_add(&c->packets, 1);
		c->bytes += len;
		return XDP_PASS;
	}
	struct counts fresh = { .packets = 1, .bytes = len };
	long err = bpf_map_update_elem(&by_src, &key, &fresh, BPF_NOEXIST);
	return err ? ERR(err) : XDP_TX;
}

char LICENSE[] SEC("license") = "GPL";
