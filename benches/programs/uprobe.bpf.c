// An empty uprobe program: the kernel's cost of tracing a native function, for benches/native.rs.
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

SEC("uprobe")
int empty(void *ctx)
{
	return 0;
}

char LICENSE[] SEC("license") = "GPL";
