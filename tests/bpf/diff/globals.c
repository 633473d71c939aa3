// Global data: .bss counters, .data initialised values updated by every run, .rodata const
// configuration and a string table copied into the packet (no bpf_printk, whose format strings
// would also land in .rodata).
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

// .bss
__u64 packets;
__u64 bytes;
__u32 short_packets;
__u16 last_proto;

// .data
__u64 magic = 0x1122334455667788;
__u32 step = 3;
char tag[8] = "livebpf";

// .rodata
const volatile __u32 min_len = 20;
const volatile __u16 mark_proto = 0x88b5;
const char names[4][8] = { "short", "ipv4", "other", "marked" };

SEC("xdp")
int globals(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	__u32 len = data_end - data;
	__u32 class;

	if ((void *)(eth + 1) > data_end)
		return XDP_ABORTED;
	packets++;
	bytes += len;
	magic = (magic << 7 | magic >> 57) + step;
	step += 2;
	last_proto = bpf_ntohs(eth->h_proto);
	tag[packets & 7] = 'A' + (len & 15);

	if (len < min_len) {
		short_packets++;
		class = 0;
	} else if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		class = 1;
	} else if (eth->h_proto == bpf_htons(mark_proto)) {
		class = 3;
	} else {
		class = 2;
	}
	// The class's name over the source MAC address and the EtherType's first bytes.
	__builtin_memcpy(eth->h_source, names[class & 3], 8);
	return class;
}

char LICENSE[] SEC("license") = "GPL";
