/*
 * The native library the `native` example traces: ordinary C, built with a patchable entry on
 * every function (build.rs: clang -fpatchable-function-entry=5 on x86-64, or gcc -pg -mfentry
 * -mnop-mcount; -fpatchable-function-entry=2 -mbranch-protection=standard on arm64).
 */

/* A 64-bit mix of a key and a seed (splitmix64's finaliser): the traced function. Not inlined
 * into demo_batch, so every call goes through its entry. */
__attribute__((noinline)) long demo_hash(long key, long seed)
{
	unsigned long z = (unsigned long)key + (unsigned long)seed * 0x9e3779b97f4a7c15ul;

	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ul;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebul;
	return (long)(z ^ (z >> 31));
}

/* The work each caller does per step: hashes a small batch (calls demo_hash). */
long demo_batch(long first, long count, long seed)
{
	long acc = 0;

	for (long i = 0; i < count; i++)
		acc ^= demo_hash(first + i, seed);
	return acc;
}
