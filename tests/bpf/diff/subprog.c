// Static subprograms that the verifier checks in their callers' context: five arguments,
// packet pointers and a pointer to the caller's stack passed down, and a call two deep.
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

struct flow {
	__u32 saddr;
	__u32 daddr;
	__u16 sport;
	__u16 dport;
	__u8 proto;
};

static __noinline __u32 mix(__u32 a, __u32 b, __u32 c, __u32 d, __u32 e)
{
	__u32 h = 0x9e3779b9;

	h = (h ^ a) * 0x01000193;
	h = (h ^ b) * 0x01000193;
	h = (h ^ c) * 0x01000193;
	h = (h ^ d) * 0x01000193;
	return (h ^ e) * 0x01000193;
}

static __noinline __u32 flow_hash(const struct flow *f, __u32 seed)
{
	return mix(f->saddr, f->daddr, (__u32)f->sport << 16 | f->dport, f->proto, seed);
}

// Fills *f from the packet; 0, or -1 when the headers are not all there.
static __noinline int parse_flow(void *data, void *data_end, struct flow *f)
{
	struct ethhdr *eth = data;
	struct iphdr *ip = (void *)(eth + 1);
	struct udphdr *udp = (void *)(ip + 1);

	if ((void *)(udp + 1) > data_end)
		return -1;
	if (eth->h_proto != bpf_htons(ETH_P_IP) || ip->ihl != 5)
		return -1;
	f->saddr = ip->saddr;
	f->daddr = ip->daddr;
	f->proto = ip->protocol;
	// TCP and UDP both start with the two ports.
	f->sport = bpf_ntohs(udp->source);
	f->dport = bpf_ntohs(udp->dest);
	return 0;
}

// Writes v big-endian at data + off when it fits; whether it did.
static __noinline int put32(void *data, void *data_end, __u32 off, __u32 v, __u32 xor)
{
	__u8 *p = data;

	if (off > 64)
		return 0;
	p += off;
	if ((void *)(p + 4) > data_end)
		return 0;
	v ^= xor;
	p[0] = v >> 24;
	p[1] = v >> 16;
	p[2] = v >> 8;
	p[3] = v;
	return 1;
}

SEC("xdp")
int subprog(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct flow f = {};

	if (parse_flow(data, data_end, &f))
		return XDP_PASS;
	__u32 h = flow_hash(&f, 42);
	// The hash over the destination MAC's last four bytes.
	if (!put32(data, data_end, 2, h, 0))
		return XDP_ABORTED;
	return h & 0xff;
}

char LICENSE[] SEC("license") = "GPL";
