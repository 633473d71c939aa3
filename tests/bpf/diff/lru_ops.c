// Every LRU flavour under a mix of operations: each UDP packet's payload names a map, an
// operation, a key and a value. The return value says what happened (hit, miss, or 100 plus the
// helper's result), so that where two engines evict differently the runs show where.
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

// The common LRU; with two possible CPUs, refills move 16 / 2 / 2 = 4 nodes at once.
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16);
	__type(key, __u32);
	__type(value, __u64);
} common SEC(".maps");

// Per-CPU values (updated in place) over the common LRU.
struct {
	__uint(type, BPF_MAP_TYPE_LRU_PERCPU_HASH);
	__uint(max_entries, 12);
	__type(key, __u32);
	__type(value, __u64);
} percpu SEC(".maps");

// One LRU list per CPU: 9 entries become a multiple of the CPU count, shared out.
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 9);
	__uint(map_flags, BPF_F_NO_COMMON_LRU);
	__type(key, __u32);
	__type(value, __u64);
} lists SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_PERCPU_HASH);
	__uint(max_entries, 8);
	__uint(map_flags, BPF_F_NO_COMMON_LRU);
	__type(key, __u32);
	__type(value, __u64);
} percpu_lists SEC(".maps");

struct op {
	__u8 map;
	__u8 op;
	__u16 pad;
	__u32 key;
	__u64 value;
};

enum { LOOKUP, ANY, NOEXIST, EXIST, DELETE, COUNT };

// Lookups mark the element used; COUNT is lru.c's lookup-or-insert.
#define APPLY(m)                                                                   \
	do {                                                                       \
		__u64 *v;                                                          \
		switch (op) {                                                      \
		case LOOKUP:                                                       \
			v = bpf_map_lookup_elem(&m, &key);                         \
			if (!v)                                                    \
				return 2;                                          \
			*v += 1;                                                   \
			return 3;                                                  \
		case ANY:                                                          \
		case NOEXIST:                                                      \
		case EXIST:                                                        \
			return 100 + bpf_map_update_elem(&m, &key, &value, op - ANY); \
		case DELETE:                                                       \
			return 100 + bpf_map_delete_elem(&m, &key);                \
		default:                                                           \
			v = bpf_map_lookup_elem(&m, &key);                         \
			if (v) {                                                   \
				*v += 1;                                           \
				return 3;                                          \
			}                                                          \
			return 100 + bpf_map_update_elem(&m, &key, &value, BPF_NOEXIST); \
		}                                                                  \
	} while (0)

SEC("xdp")
int lru_ops(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = (void *)(eth + 1);
	struct udphdr *udp = (void *)(ip + 1);
	struct op *o = (void *)(udp + 1);

	if ((void *)(o + 1) > data_end || eth->h_proto != bpf_htons(ETH_P_IP) ||
	    ip->ihl != 5 || ip->protocol != IPPROTO_UDP)
		return XDP_PASS;
	__u32 key = o->key;
	__u64 value = o->value;
	__u8 op = o->op;

	switch (o->map) {
	case 0:
		APPLY(common);
	case 1:
		APPLY(percpu);
	case 2:
		APPLY(lists);
	default:
		APPLY(percpu_lists);
	}
}

char LICENSE[] SEC("license") = "GPL";
