// A legacy-named section, SEC("xdp_patch_ports"), that rewrites UDP ports, with a map in the
// legacy `maps` section (struct bpf_map_def layout) and programs in `socket`, `classifier` and
// an unknown section (a raw program).
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/udp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

struct legacy_map_def {
	unsigned int type;
	unsigned int key_size;
	unsigned int value_size;
	unsigned int max_entries;
	unsigned int map_flags;
};

struct legacy_map_def SEC("maps") port_map = {
	.type = BPF_MAP_TYPE_ARRAY,
	.key_size = sizeof(__u32),
	.value_size = sizeof(__u16),
	.max_entries = 16,
};

SEC("xdp_patch_ports")
int patch_ports(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = (void *)(eth + 1);
	struct udphdr *udp = (void *)(ip + 1);
	__u32 key;
	__u16 *port;

	if ((void *)(udp + 1) > data_end)
		return XDP_PASS;
	if (eth->h_proto != bpf_htons(ETH_P_IP) || ip->protocol != 17)
		return XDP_PASS;
	key = bpf_ntohs(udp->dest) & 15;
	port = bpf_map_lookup_elem(&port_map, &key);
	if (port && *port)
		udp->dest = bpf_htons(*port);
	return XDP_PASS;
}

SEC("socket")
int sock_filter(struct __sk_buff *skb)
{
	return skb->len;
}

SEC("classifier")
int cls_main(struct __sk_buff *skb)
{
	return 0;
}

SEC("livebpf/custom")
int raw_prog(void *ctx)
{
	return 3;
}

char LICENSE[] SEC("license") = "GPL";
