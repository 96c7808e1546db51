//! The segment-copy kernel: copies a table of (src, dst, len) device ranges in short-lived
//! 4 KiB blocks, 16 bytes per thread where alignment allows. Compiled at run time with NVRTC for the
//! device's architecture, so one binary serves every GPU and CUDA 12/13 driver.

use std::ffi::{CString, c_void};

use cudarc::driver::sys;
use cudarc::nvrtc::{CompileOptions, compile_ptx_with_opts};

use super::driver::{Result, Stream};
use crate::device::DeviceError;

// One block copies one 4 KiB piece of one table entry (blockIdx.x = entry, blockIdx.y =
// piece), each thread a single 16-byte load and store, so blocks live about a microsecond.
// Long-lived copy blocks hold SMs across the inference engine's GEMM wave boundaries:
// measured on the H100, blocks that each looped over whole 32 KiB segments slowed a
// concurrent GEMM by 17-20% whatever the grid size; an equal byte rate in short blocks
// costs about 2%. Loads and stores are cache-streaming (`.cs`): each byte is touched once.
const SOURCE: &str = r#"
__device__ __forceinline__ void copy16(unsigned long long src, unsigned long long dst) {
    unsigned int a, b, c, d;
    asm volatile("ld.global.cs.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(a), "=r"(b), "=r"(c), "=r"(d) : "l"(src));
    asm volatile("st.global.cs.v4.u32 [%0], {%1, %2, %3, %4};"
                 :: "l"(dst), "r"(a), "r"(b), "r"(c), "r"(d) : "memory");
}

extern "C" __global__ void pegaflow_copy_segments(const unsigned long long* __restrict__ table,
                                                  unsigned int n) {
    const unsigned int s = blockIdx.x;
    if (s >= n) return;
    const unsigned long long src = table[3 * s];
    const unsigned long long dst = table[3 * s + 1];
    const unsigned long long len = table[3 * s + 2];
    const unsigned long long piece = blockDim.x * 16ull;
    const bool aligned = ((src | dst | len) & 15ull) == 0;
    for (unsigned long long start = blockIdx.y * piece; start < len; start += gridDim.y * piece) {
        const unsigned long long end = start + piece < len ? start + piece : len;
        if (aligned) {
            const unsigned long long i = start + threadIdx.x * 16ull;
            if (i < end) copy16(src + i, dst + i);
        } else {
            const unsigned char* in = reinterpret_cast<const unsigned char*>(src);
            unsigned char* out = reinterpret_cast<unsigned char*>(dst);
            for (unsigned long long i = start + threadIdx.x; i < end; i += blockDim.x) out[i] = in[i];
        }
    }
}
"#;

/// Threads per block: 256 × 16 B = one 4 KiB piece per block.
const THREADS: u32 = 256;
/// Bytes one block copies.
pub(crate) const PIECE_BYTES: u64 = THREADS as u64 * 16;
/// Most pieces per entry launched at once; longer entries loop (grid.y stride).
const MAX_PIECES: u64 = 64;

/// The loaded kernel of one context.
pub(crate) struct CopyKernel {
    module: sys::CUmodule,
    function: sys::CUfunction,
}

// SAFETY: module and function handles are context-bound values usable from any thread
// that has the context current.
unsafe impl Send for CopyKernel {}

impl CopyKernel {
    /// Compiles and loads the kernel for compute capability `cc` (current context).
    pub fn load(cc: (i32, i32)) -> Result<Self> {
        let options = CompileOptions {
            options: vec![format!("--gpu-architecture=compute_{}{}", cc.0, cc.1)],
            ..Default::default()
        };
        let ptx = std::panic::catch_unwind(|| compile_ptx_with_opts(SOURCE, options))
            .map_err(|_| DeviceError::Cuda("NVRTC (libnvrtc.so) is not available".into()))?
            .map_err(|e| DeviceError::Cuda(format!("NVRTC failed: {e:?}")))?;
        let image = CString::new(ptx.to_src()).map_err(|_| DeviceError::Cuda("PTX holds a NUL byte".into()))?;
        let name = c"pegaflow_copy_segments";
        // SAFETY: `image` is NUL-terminated PTX; out-pointers are valid; the module is
        // unloaded in Drop.
        unsafe {
            let mut module = std::ptr::null_mut();
            sys::cuModuleLoadData(&mut module, image.as_ptr().cast())
                .result()
                .map_err(|e| DeviceError::Cuda(format!("cuModuleLoadData: {e:?}")))?;
            let mut function = std::ptr::null_mut();
            if let Err(e) = sys::cuModuleGetFunction(&mut function, module, name.as_ptr()).result() {
                let _ = sys::cuModuleUnload(module);
                return Err(DeviceError::Cuda(format!("cuModuleGetFunction: {e:?}")));
            }
            Ok(Self { module, function })
        }
    }

    /// Launches the copy of `n` table entries at device address `table` on `stream`;
    /// `longest` is the largest entry's length.
    ///
    /// # Safety
    /// `table` must hold `n` (src, dst, len) triples of valid, non-overlapping device
    /// ranges that stay valid until the stream passes the kernel.
    pub unsafe fn launch(&self, stream: &Stream, table: u64, n: u32, longest: u64) -> Result<()> {
        let pieces = longest.div_ceil(PIECE_BYTES).clamp(1, MAX_PIECES) as u32;
        let mut table = table;
        let mut n = n;
        let mut params: [*mut c_void; 2] = [(&mut table as *mut u64).cast(), (&mut n as *mut u32).cast()];
        // SAFETY: the caller's contract; `params` point at live locals for the call.
        unsafe {
            sys::cuLaunchKernel(
                self.function,
                n.max(1),
                pieces,
                1,
                THREADS,
                1,
                1,
                0,
                stream.0,
                params.as_mut_ptr(),
                std::ptr::null_mut(),
            )
            .result()
            .map_err(|e| DeviceError::Cuda(format!("cuLaunchKernel: {e:?}")))
        }
    }
}

impl Drop for CopyKernel {
    fn drop(&mut self) {
        // SAFETY: loaded by cuModuleLoadData.
        let _ = unsafe { sys::cuModuleUnload(self.module) };
    }
}
