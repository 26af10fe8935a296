// kd_cpu_kernel_avx2.cpp — the AVX2 copy of the CPU kernel body.
//
// build_ext.py compiles this file alone with -DCPU_CAPABILITY=AVX2 -DCPU_CAPABILITY_AVX2 and
// -mavx2 -mfma -mf16c,
// so the kernel in kd_cpu_driver.h lands in namespace rcfast::cpu::AVX2
// with at::vec's AVX2 vector types; kd_cpu.cpp calls it when
// at::get_cpu_capability() (which honours ATEN_CPU_CAPABILITY) says AVX2.
#if !defined(CPU_CAPABILITY_AVX2)
#error "kd_cpu_kernel_avx2.cpp must be compiled with -DCPU_CAPABILITY=AVX2 -DCPU_CAPABILITY_AVX2 (see build_ext.py)"
#endif
#include "kd_cpu_driver.h"
