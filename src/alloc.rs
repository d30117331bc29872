//! Allocator tuning for tape workloads.
//!
//! A meta-training step builds a tape of many large temporary arrays and drops it at the
//! end of the step. With glibc's default settings, arrays above 128 KiB are `mmap`ed and
//! returned to the operating system when freed, so the next step faults every page in and
//! has it zeroed again — for small tasks that costs more than the arithmetic. (PyTorch's
//! caching allocator avoids the same cost by keeping freed blocks.)
//! [`tune_allocator`] raises glibc's thresholds so freed memory stays in the process
//! and is reused. It is opt-in because it changes a process-wide setting: call it once at
//! the start of a program. The examples and bench binaries do.

/// Keeps freed memory in the process for reuse (glibc: `M_MMAP_THRESHOLD` and
/// `M_TRIM_THRESHOLD` set to 1 GiB). Returns whether the setting was applied; on other
/// C libraries it does nothing and returns `false`.
pub fn tune_allocator() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        const GIB: libc::c_int = 1 << 30;
        // SAFETY: mallopt only changes allocator parameters; it is safe to call at any
        // time, and the values are within glibc's documented ranges.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, GIB) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, GIB) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}
