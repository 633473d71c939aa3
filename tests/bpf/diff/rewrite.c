// Packet rewriter: swaps the MAC addresses, decrements the IPv4 TTL and rewrites UDP or TCP
// destination port 7 (echo) to 7007, updating the IP and L4 checksums incrementally (RFC 1624)
// rather than recomputing them.
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#define OLD_PORT 7
#define NEW_PORT 7007

static __always_inline __u16 fold(__u32 sum)
{
	sum = (sum & 0xffff) + (sum >> 16);
	return (sum & 0xffff) + (sum >> 16);
}

// HC' = ~(~HC + ~m + m'), RFC 1624 eqn. 3: the checksum after one 16-bit word changes.
static __always_inline void csum_replace2(__sum16 *check, __be16 from, __be16 to)
{
	*check = ~fold((__u16)~*check + (__u16)~from + (__u16)to);
}

SEC("xdp")
int rewrite(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = (void *)(eth + 1);
	unsigned char mac[ETH_ALEN];

	if ((void *)(ip + 1) > data_end)
		return XDP_ABORTED;
	if (eth->h_proto != bpf_htons(ETH_P_IP) || ip->ihl != 5)
		return XDP_PASS;
	if (ip->ttl <= 1)
		return XDP_DROP;

	__builtin_memcpy(mac, eth->h_dest, ETH_ALEN);
	__builtin_memcpy(eth->h_dest, eth->h_source, ETH_ALEN);
	__builtin_memcpy(eth->h_source, mac, ETH_ALEN);

	// TTL and protocol share one checksummed 16-bit word.
	__be16 *ttl_word = (__be16 *)&ip->ttl;
	__be16 old_word = *ttl_word;
	ip->ttl--;
	csum_replace2(&ip->check, old_word, *ttl_word);

	if (ip->protocol == IPPROTO_UDP) {
		struct udphdr *udp = (void *)(ip + 1);

		if ((void *)(udp + 1) > data_end)
			return XDP_ABORTED;
		if (udp->dest != bpf_htons(OLD_PORT))
			return XDP_TX;
		udp->dest = bpf_htons(NEW_PORT);
		// A zero UDP checksum means "none"; a computed zero is sent as 0xffff.
		if (udp->check) {
			csum_replace2(&udp->check, bpf_htons(OLD_PORT), bpf_htons(NEW_PORT));
			if (!udp->check)
				udp->check = 0xffff;
		}
		return XDP_TX;
	}
	if (ip->protocol == IPPROTO_TCP) {
		struct tcphdr *tcp = (void *)(ip + 1);

		if ((void *)(tcp + 1) > data_end)
			return XDP_ABORTED;
		if (tcp->dest != bpf_htons(OLD_PORT))
			return XDP_TX;
		tcp->dest = bpf_htons(NEW_PORT);
		csum_replace2(&tcp->check, bpf_htons(OLD_PORT), bpf_htons(NEW_PORT));
		return XDP_TX;
	}
	return XDP_TX;
}

char LICENSE[] SEC("license") = "GPL";
