// A CO-RE field access against a kernel type: refused.
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

struct task_struct {
	int pid;
	int tgid;
} __attribute__((preserve_access_index));

SEC("fentry/do_exit")
int read_tgid(__u64 *ctx)
{
	struct task_struct *task = (void *)ctx[0];

	return task->tgid;
}

char LICENSE[] SEC("license") = "GPL";
