// A kfunc call (an extern __ksym function): refused.
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

extern void bpf_rcu_read_lock(void) __ksym;

SEC("xdp")
int uses_kfunc(struct xdp_md *ctx)
{
	bpf_rcu_read_lock();
	return XDP_PASS;
}

char LICENSE[] SEC("license") = "GPL";
