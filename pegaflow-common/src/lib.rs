//! What the PegaFlow engine, the server and the Python binding share, apart from the
//! engine itself: sealed shared memory handed over by descriptor (`shm`), the
//! load-completion flag a client polls (`load_state`), and the spin/wait helpers that
//! spare idle-thread wake-ups (`spin`). No engine logic lives here.

pub mod load_state;
pub mod shm;
pub mod spin;
