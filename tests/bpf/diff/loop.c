// bpf_loop with a callback and a context struct on the caller's stack: sums the UDP payload's
// bytes up to a 0xff stop byte and writes the sum and the count over the UDP checksum field.
// A payload starting 0xee asks bpf_loop for an unknown flag, which it refuses.
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

struct sum_ctx {
	void *payload;
	void *data_end;
	__u32 sum;
	__u32 seen;
};

static int add_byte(__u32 i, struct sum_ctx *c)
{
	__u8 *p = c->payload;

	if (i >= 256)
		return 1;
	p += i;
	if ((void *)(p + 1) > c->data_end)
		return 1;
	if (*p == 0xff)
		return 1; // stop
	c->sum += *p * (i + 1);
	c->seen++;
	return 0;
}

__u64 last_ret;

SEC("xdp")
int loop(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = (void *)(eth + 1);
	struct udphdr *udp = (void *)(ip + 1);

	if ((void *)(udp + 1) > data_end || eth->h_proto != bpf_htons(ETH_P_IP) ||
	    ip->ihl != 5 || ip->protocol != IPPROTO_UDP)
		return XDP_PASS;
	struct sum_ctx c = { .payload = udp + 1, .data_end = data_end };
	__u64 flags = 0;
	__u8 *first = (void *)(udp + 1);

	if ((void *)(first + 1) <= data_end && *first == 0xee)
		flags = 1;
	long n = bpf_loop(bpf_ntohs(udp->len) - sizeof(*udp), add_byte, &c, flags);
	last_ret = n;
	if (n < 0)
		return 100 - n;
	udp->check = bpf_htons(c.sum);
	udp->len = bpf_htons(c.seen);
	return n;
}

char LICENSE[] SEC("license") = "GPL";
