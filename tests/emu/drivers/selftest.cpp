// The self-test kernels carry their own entry point (selftest/selftest_kernel.cu).
