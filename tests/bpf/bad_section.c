// A global in a section that is neither global data nor maps: the relocation is refused.
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

int odd_value SEC(".odd_section") = 3;

SEC("xdp")
int uses_odd(struct xdp_md *ctx)
{
	return odd_value;
}

char LICENSE[] SEC("license") = "GPL";
