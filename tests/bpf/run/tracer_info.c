// An XDP target and an fentry tracer of it that records what the tracing helpers report: the
// link's cookie and the traced program's address, in .bss.
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

__u64 cookie;
__u64 func_ip;
__u64 entries;

SEC("xdp")
int target(struct xdp_md *ctx)
{
	return XDP_PASS;
}

SEC("fentry/target")
int record(unsigned long long *ctx)
{
	cookie = bpf_get_attach_cookie(ctx);
	func_ip = bpf_get_func_ip(ctx);
	entries++;
	return 0;
}

char LICENSE[] SEC("license") = "GPL";
