// An XDP packet counter: counts packets and bytes per IPv4 source address in a hash map and
// drops what is not IPv4. Run it with
//   clang-19 -O2 -g -target bpf -I/usr/include/x86_64-linux-gnu -c examples/xdp_counter.bpf.c -o xdp_counter.o
//   livebpf run xdp_counter.o --packet HEX --packet HEX --json
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

struct counters {
	__u64 packets;
	__u64 bytes;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u32);
	__type(value, struct counters);
} by_source SEC(".maps");

/* Packets that were not IPv4, in .bss. */
__u64 not_ipv4;

SEC("xdp")
int count_sources(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = (void *)(eth + 1);
	struct counters *c;
	__u32 source;

	if ((void *)(ip + 1) > data_end || eth->h_proto != bpf_htons(ETH_P_IP)) {
		__sync_fetch_and_add(&not_ipv4, 1);
		return XDP_DROP;
	}
	source = ip->saddr;
	c = bpf_map_lookup_elem(&by_source, &source);
	if (!c) {
		struct counters zero = {};

		bpf_map_update_elem(&by_source, &source, &zero, BPF_NOEXIST);
		c = bpf_map_lookup_elem(&by_source, &source);
		if (!c)
			return XDP_ABORTED;
	}
	__sync_fetch_and_add(&c->packets, 1);
	__sync_fetch_and_add(&c->bytes, data_end - data);
	return XDP_PASS;
}

char LICENSE[] SEC("license") = "GPL";
