//! The segment-copy kernel: copies a table of (src, dst, len) device ranges, 16 bytes per
//! thread per step where alignment allows. Compiled at run time with NVRTC for the
//! device's architecture, so one binary serves every GPU and CUDA 12/13 driver.

use std::ffi::{CString, c_void};

use cudarc::driver::sys;
use cudarc::nvrtc::{CompileOptions, compile_ptx_with_opts};

use super::driver::{Result, Stream};
use crate::device::DeviceError;

const SOURCE: &str = r#"
extern "C" __global__ void pegaflow_copy_segments(const unsigned long long* __restrict__ table,
                                                  unsigned int n) {
    for (unsigned int s = blockIdx.x; s < n; s += gridDim.x) {
        const unsigned long long src = table[3 * s];
        const unsigned long long dst = table[3 * s + 1];
        const unsigned long long len = table[3 * s + 2];
        if (((src | dst | len) & 15ull) == 0) {
            const uint4* in = reinterpret_cast<const uint4*>(src);
            uint4* out = reinterpret_cast<uint4*>(dst);
            const unsigned long long words = len >> 4;
            for (unsigned long long i = threadIdx.x; i < words; i += blockDim.x) out[i] = in[i];
        } else {
            const unsigned char* in = reinterpret_cast<const unsigned char*>(src);
            unsigned char* out = reinterpret_cast<unsigned char*>(dst);
            for (unsigned long long i = threadIdx.x; i < len; i += blockDim.x) out[i] = in[i];
        }
    }
}
"#;

/// Threads per block.
const THREADS: u32 = 512;

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

    /// Launches the copy of `n` table entries at device address `table` on `stream`.
    ///
    /// # Safety
    /// `table` must hold `n` (src, dst, len) triples of valid, non-overlapping device
    /// ranges that stay valid until the stream passes the kernel.
    pub unsafe fn launch(&self, stream: &Stream, table: u64, n: u32, grid: u32) -> Result<()> {
        let mut table = table;
        let mut n = n;
        let mut params: [*mut c_void; 2] = [(&mut table as *mut u64).cast(), (&mut n as *mut u32).cast()];
        // SAFETY: the caller's contract; `params` point at live locals for the call.
        unsafe {
            sys::cuLaunchKernel(
                self.function,
                grid.min(n).max(1),
                1,
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
