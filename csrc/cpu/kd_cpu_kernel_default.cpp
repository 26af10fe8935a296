// kd_cpu_kernel_default.cpp — the DEFAULT copy of the CPU kernel body.
//
// build_ext.py compiles this file alone with -DCPU_CAPABILITY=DEFAULT and
// no -m flags: the portable at::vec fallback, runnable on any x86-64 (and other) CPU,
// so the kernel in kd_cpu_driver.h lands in namespace rcfast::cpu::DEFAULT
// with at::vec's DEFAULT vector types; kd_cpu.cpp calls it when
// at::get_cpu_capability() (which honours ATEN_CPU_CAPABILITY) says DEFAULT.
#if !defined(CPU_CAPABILITY) || defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
#error "kd_cpu_kernel_default.cpp must be compiled with -DCPU_CAPABILITY=DEFAULT only (see build_ext.py)"
#endif
#include "kd_cpu_driver.h"
