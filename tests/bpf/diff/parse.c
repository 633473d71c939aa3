// Ethernet (with at most one 802.1Q tag) / IPv4 (with options) / UDP / TCP parser. Every read is
// bounds-checked against data_end; each class of packet gets its own return value, so the
// differential test sees which branch every packet took. No maps: the verdict is the output.
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

struct vlan_hdr {
	__be16 tci;
	__be16 proto;
};

// Return values: XDP actions for the plain cases, larger numbers for the branches that only
// this test cares about (BPF_PROG_TEST_RUN reports any value).
enum verdict {
	V_ABORTED = XDP_ABORTED, // truncated or malformed
	V_DROP = XDP_DROP,	 // UDP to port 53, TCP SYN to port 22
	V_PASS = XDP_PASS,	 // anything else that parsed
	V_TX = XDP_TX,		 // TCP to port 80
	V_NOT_IP = 10,		 // an EtherType other than IPv4
	V_FRAGMENT = 11,	 // a non-first IPv4 fragment: no L4 header to read
	V_OTHER_L4 = 12,	 // IPv4 carrying neither UDP nor TCP
	V_BAD_IHL = 13,		 // IHL below 5
	V_BAD_TOTLEN = 14,	 // tot_len shorter than the header or longer than the packet
	V_BAD_DOFF = 15,	 // TCP data offset below 5 or past the packet
	V_VLAN_DEEP = 16,	 // a second VLAN tag (only one is parsed)
};

SEC("xdp")
int parse(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	void *cursor = eth + 1;
	__u16 proto;

	if (cursor > data_end)
		return V_ABORTED;
	proto = eth->h_proto;
	if (proto == bpf_htons(ETH_P_8021Q)) {
		struct vlan_hdr *vlan = cursor;

		if ((void *)(vlan + 1) > data_end)
			return V_ABORTED;
		proto = vlan->proto;
		cursor = vlan + 1;
		if (proto == bpf_htons(ETH_P_8021Q))
			return V_VLAN_DEEP;
	}
	if (proto != bpf_htons(ETH_P_IP))
		return V_NOT_IP;

	struct iphdr *ip = cursor;
	if ((void *)(ip + 1) > data_end)
		return V_ABORTED;
	if (ip->ihl < 5)
		return V_BAD_IHL;
	__u32 hlen = ip->ihl * 4;
	__u32 tot = bpf_ntohs(ip->tot_len);
	if (tot < hlen || (void *)ip + tot > data_end)
		return V_BAD_TOTLEN;
	if (ip->frag_off & bpf_htons(0x1fff))
		return V_FRAGMENT;
	void *l4 = (void *)ip + hlen;

	if (ip->protocol == IPPROTO_UDP) {
		struct udphdr *udp = l4;

		if ((void *)(udp + 1) > data_end)
			return V_ABORTED;
		return udp->dest == bpf_htons(53) ? V_DROP : V_PASS;
	}
	if (ip->protocol == IPPROTO_TCP) {
		struct tcphdr *tcp = l4;

		if ((void *)(tcp + 1) > data_end)
			return V_ABORTED;
		if (tcp->doff < 5 || l4 + tcp->doff * 4 > data_end)
			return V_BAD_DOFF;
		if (tcp->dest == bpf_htons(22) && tcp->syn && !tcp->ack)
			return V_DROP;
		return tcp->dest == bpf_htons(80) ? V_TX : V_PASS;
	}
	return V_OTHER_L4;
}

char LICENSE[] SEC("license") = "GPL";
