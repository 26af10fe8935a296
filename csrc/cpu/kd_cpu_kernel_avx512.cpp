// kd_cpu_kernel_avx512.cpp — the AVX512 copy of the CPU kernel body.
//
// build_ext.py compiles this file alone with -DCPU_CAPABILITY=AVX512 -DCPU_CAPABILITY_AVX512 and
// -mavx512f -mavx512bw -mavx512vl -mavx512dq -mfma,
// so the kernel in kd_cpu_driver.h lands in namespace rcfast::cpu::AVX512
// with at::vec's AVX512 vector types; kd_cpu.cpp calls it when
// at::get_cpu_capability() (which honours ATEN_CPU_CAPABILITY) says AVX512.
#if !defined(CPU_CAPABILITY_AVX512)
#error "kd_cpu_kernel_avx512.cpp must be compiled with -DCPU_CAPABILITY=AVX512 -DCPU_CAPABILITY_AVX512 (see build_ext.py)"
#endif
#include "kd_cpu_driver.h"
