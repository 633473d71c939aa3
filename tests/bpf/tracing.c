// Tracing programs for livebpf's trampolines: an fentry/fexit pair on one target, plus
// fmod_ret and freplace. ctx points at the target's arguments (and, for fexit, its result).
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

__u64 entry_calls;
__u64 last_result;

SEC("fentry/target_fn")
int on_entry(__u64 *ctx)
{
	entry_calls += ctx[0];
	return 0;
}

SEC("fexit/target_fn")
int on_exit(__u64 *ctx)
{
	last_result = ctx[2];
	return 0;
}

SEC("fmod_ret/target_fn")
int override_ret(__u64 *ctx)
{
	return 7;
}

SEC("freplace/other_fn")
int replacement(__u64 *ctx)
{
	return 1;
}

char LICENSE[] SEC("license") = "GPL";
