//! Meta-training across processes and machines: the meta-batch is split, the model is
//! not.
//!
//! A [`Comm`] is what the meta-learners talk to. Task `i` of a meta-batch (or of an
//! evaluation) belongs to one rank, in contiguous blocks; each rank runs its own tasks
//! with the meta-batch mapper on its own rayon threads; then every rank receives every
//! task's result — gradients, losses, accuracies, observed batch-norm statistics — and
//! reduces them **in task order**, exactly as one process would. So every rank ends each
//! step with bitwise the same parameters, optimiser state and statistics, and these are
//! bitwise those of a run without MPI, for any number of ranks × threads.
//!
//! Two transports: [`Comm::local`], the single process (the trivial case: no encoding, no
//! copy, it costs nothing), and, with the cargo feature `mpi`, `Comm::mpi` on the
//! system's MPI (Open MPI through the `mpi` crate). [`Comm::from_env`] picks MPI when the
//! program was started by `mpirun` and the feature is on.
//!
//! What crosses the network per meta-step is one all-gather of the per-task results
//! (about `tasks × parameters × size_of::<F>()` bytes in all); [`Comm::traffic`] counts the
//! bytes each rank sent and received. Task data never crosses: every rank derives the
//! same episodes from the seed.

use crate::{Error, Float, Result};
use ndarray::{ArrayD, IxDyn};
use std::fmt::{self, Debug};
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// The byte-level exchange a [`Comm`] runs on.
pub trait Transport: Send + Sync {
    /// This process's rank, `0..size`.
    fn rank(&self) -> usize;
    /// Number of ranks.
    fn size(&self) -> usize;
    /// Every rank's `mine`, in rank order, on every rank (an all-gather of byte buffers
    /// of any lengths). Every rank must call it the same number of times.
    fn all_gather(&self, mine: &[u8]) -> Vec<Vec<u8>>;
    /// Ends the whole job after an error that the ranks cannot agree on.
    fn abort(&self, code: i32) -> !;
    /// A name for messages (`"local"`, `"mpi"`).
    fn name(&self) -> &'static str;
}

/// The single process: rank 0 of 1.
#[derive(Debug, Clone, Copy, Default)]
pub struct Local;

impl Transport for Local {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn all_gather(&self, mine: &[u8]) -> Vec<Vec<u8>> {
        vec![mine.to_vec()]
    }
    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
    fn name(&self) -> &'static str {
        "local"
    }
}

/// A communicator: the ranks of a job, and the bytes exchanged so far.
#[derive(Clone)]
pub struct Comm {
    transport: Arc<dyn Transport>,
    sent: Arc<AtomicU64>,
    received: Arc<AtomicU64>,
}

impl Debug for Comm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Comm({}, rank {} of {})",
            self.transport.name(),
            self.rank(),
            self.size()
        )
    }
}

impl Default for Comm {
    fn default() -> Self {
        Comm::local()
    }
}

impl Comm {
    /// The single process.
    pub fn local() -> Self {
        Comm::new(Arc::new(Local))
    }

    /// A communicator over any transport.
    pub fn new(transport: Arc<dyn Transport>) -> Self {
        Comm {
            transport,
            sent: Arc::new(AtomicU64::new(0)),
            received: Arc::new(AtomicU64::new(0)),
        }
    }

    /// MPI's world communicator (initialising MPI on first use; it is finalised when the
    /// process exits).
    ///
    /// # Errors
    /// [`Error::Config`] if MPI cannot be initialised.
    #[cfg(feature = "mpi")]
    pub fn mpi() -> Result<Self> {
        Ok(Comm::new(Arc::new(mpi_transport::Mpi::world()?)))
    }

    /// MPI when the process was started by `mpirun` (Open MPI's or MPICH's environment)
    /// and the crate was built with the feature `mpi`; the single process otherwise.
    ///
    /// # Errors
    /// [`Error::Config`] when started by `mpirun` with more than one rank but built
    /// without the feature (each rank would silently train alone), or when MPI cannot be
    /// initialised.
    pub fn from_env() -> Result<Self> {
        let size = ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE"]
            .iter()
            .find_map(|v| std::env::var(v).ok()?.parse::<usize>().ok());
        match size {
            None => Ok(Comm::local()),
            #[cfg(feature = "mpi")]
            Some(_) => Comm::mpi(),
            #[cfg(not(feature = "mpi"))]
            Some(1) => Ok(Comm::local()),
            #[cfg(not(feature = "mpi"))]
            Some(n) => Err(Error::Config(format!(
                "started by mpirun with {n} ranks, but this program was built without \
                 metagrad's `mpi` feature: every rank would train alone. Rebuild with \
                 `--features mpi`"
            ))),
        }
    }

    /// This process's rank.
    pub fn rank(&self) -> usize {
        self.transport.rank()
    }

    /// Number of ranks.
    pub fn size(&self) -> usize {
        self.transport.size()
    }

    /// Whether this is rank 0, the one that prints and writes files.
    pub fn is_root(&self) -> bool {
        self.rank() == 0
    }

    /// Ends the whole job with `code` (MPI's abort: every rank stops). For an error that
    /// only this rank has seen (a file it could not write), so that the others do not
    /// wait for it forever; the single process simply exits.
    pub fn abort(&self, code: i32) -> ! {
        self.transport.abort(code)
    }

    /// Bytes this rank has sent and received so far (the payloads of the exchanges).
    pub fn traffic(&self) -> (u64, u64) {
        (
            self.sent.load(Ordering::Relaxed),
            self.received.load(Ordering::Relaxed),
        )
    }

    /// The contiguous block of `0..n` that `rank` owns (ranks beyond `n` own nothing).
    pub fn block_of(&self, rank: usize, n: usize) -> Range<usize> {
        let size = self.size();
        (rank * n / size)..((rank + 1) * n / size)
    }

    /// Every rank's bytes, in rank order, counting the traffic.
    fn exchange(&self, mine: &[u8]) -> Vec<Vec<u8>> {
        let all = self.transport.all_gather(mine);
        if self.size() > 1 {
            let others: usize = all.iter().map(Vec::len).sum::<usize>() - mine.len();
            self.sent
                .fetch_add((mine.len() * (self.size() - 1)) as u64, Ordering::Relaxed);
            self.received.fetch_add(others as u64, Ordering::Relaxed);
        }
        all
    }

    /// Runs `f(0), …, f(n − 1)` across the ranks — each rank its own contiguous block,
    /// with [`map_tasks`](crate::map_fn::map_tasks) on its own threads — and returns all
    /// `n` results in index order on every rank. A panicking task becomes the same
    /// [`Error::Task`] (the lowest failing index) on every rank.
    ///
    /// # Errors
    /// [`Error::Task`] as above.
    pub fn map<T, Fun>(&self, n: usize, parallel_iterations: usize, f: Fun) -> Result<Vec<T>>
    where
        T: Wire + Send,
        Fun: Fn(usize) -> T + Sync,
    {
        if self.size() == 1 {
            return crate::map_fn::map_tasks(n, parallel_iterations, f);
        }
        let mine = self.block_of(self.rank(), n);
        let start = mine.start;
        let local = crate::map_fn::map_tasks(mine.len(), parallel_iterations, |j| f(start + j));
        let mut buf = Vec::new();
        match &local {
            Ok(items) => {
                0u8.put(&mut buf);
                items.len().put(&mut buf);
                items.iter().for_each(|t| t.put(&mut buf));
            }
            Err(Error::Task { index, message }) => {
                1u8.put(&mut buf);
                (start + index).put(&mut buf);
                message.put(&mut buf);
            }
            Err(e) => unreachable!("map_tasks only fails with Error::Task, got {e}"),
        }
        let all = self.exchange(&buf);
        drop(buf);
        let mut out = Vec::with_capacity(n);
        let mut first_error = None;
        for (rank, bytes) in all.iter().enumerate() {
            let decoded = decode_block::<T>(bytes);
            match decoded {
                Ok(Ok(items)) => out.extend(items),
                Ok(Err((index, message))) => {
                    first_error.get_or_insert(Error::Task { index, message });
                }
                Err(e) => {
                    // A garbled message: the ranks no longer agree on anything.
                    eprintln!("metagrad: rank {rank}'s results cannot be read ({e}); aborting");
                    self.transport.abort(3)
                }
            }
        }
        match first_error {
            Some(e) => Err(e),
            None if out.len() == n => Ok(out),
            None => {
                eprintln!("metagrad: {} results for {n} tasks; aborting", out.len());
                self.transport.abort(3)
            }
        }
    }

    /// Checks that every rank was started with the same configuration: `fields` are
    /// `(name, value)` pairs (seed, meta-batch, model, float type, …), compared with rank
    /// 0's.
    ///
    /// # Errors
    /// [`Error::Config`] on every rank, naming the first field that differs, the rank and
    /// both values.
    pub fn check_same(&self, fields: &[(&str, String)]) -> Result<()> {
        if self.size() == 1 {
            return Ok(());
        }
        let mut buf = Vec::new();
        fields.len().put(&mut buf);
        for (name, value) in fields {
            name.to_string().put(&mut buf);
            value.put(&mut buf);
        }
        let all = self.exchange(&buf);
        let read = |bytes: &[u8]| -> Result<Vec<(String, String)>> {
            let mut r = bytes;
            let n = usize::get(&mut r)?;
            (0..n)
                .map(|_| Ok((String::get(&mut r)?, String::get(&mut r)?)))
                .collect()
        };
        let root = read(&all[0])?;
        for (rank, bytes) in all.iter().enumerate().skip(1) {
            let theirs = read(bytes)?;
            if theirs.len() != root.len() {
                return Err(Error::Config(format!(
                    "rank {rank} describes its configuration with {} fields, rank 0 with {}",
                    theirs.len(),
                    root.len()
                )));
            }
            for ((name, a), (_, b)) in root.iter().zip(&theirs) {
                if a != b {
                    return Err(Error::Config(format!(
                        "the ranks were started with different configurations: {name} is \
                         {a:?} on rank 0 but {b:?} on rank {rank}"
                    )));
                }
            }
        }
        Ok(())
    }
}

type Block<T> = std::result::Result<Vec<T>, (usize, String)>;

fn decode_block<T: Wire>(bytes: &[u8]) -> Result<Block<T>> {
    let mut r = bytes;
    match u8::get(&mut r)? {
        0 => {
            let n = usize::get(&mut r)?;
            Ok(Ok((0..n).map(|_| T::get(&mut r)).collect::<Result<_>>()?))
        }
        1 => Ok(Err((usize::get(&mut r)?, String::get(&mut r)?))),
        t => Err(wire_error(format!("unknown block tag {t}"))),
    }
}

fn wire_error(message: String) -> Error {
    Error::Config(format!("malformed message between ranks: {message}"))
}

/// A value that crosses between ranks: written as plain little-endian bytes (floats by
/// their bit patterns, so they arrive bitwise).
pub trait Wire: Sized {
    /// Appends the value to `out`.
    fn put(&self, out: &mut Vec<u8>);
    /// Reads a value from the front of `input`, advancing it.
    ///
    /// # Errors
    /// [`Error::Config`] for truncated or malformed bytes.
    fn get(input: &mut &[u8]) -> Result<Self>;
}

fn take<'a>(input: &mut &'a [u8], n: usize) -> Result<&'a [u8]> {
    if input.len() < n {
        return Err(wire_error(format!(
            "{n} bytes wanted, {} left",
            input.len()
        )));
    }
    let (head, rest) = input.split_at(n);
    *input = rest;
    Ok(head)
}

macro_rules! wire_int {
    ($($t:ty),*) => {$(
        impl Wire for $t {
            fn put(&self, out: &mut Vec<u8>) {
                out.extend_from_slice(&self.to_le_bytes());
            }
            fn get(input: &mut &[u8]) -> Result<Self> {
                let b = take(input, std::mem::size_of::<$t>())?;
                Ok(<$t>::from_le_bytes(b.try_into().expect("length checked")))
            }
        }
    )*};
}
wire_int!(u8, u64, f64);

impl Wire for usize {
    fn put(&self, out: &mut Vec<u8>) {
        (*self as u64).put(out)
    }
    fn get(input: &mut &[u8]) -> Result<Self> {
        usize::try_from(u64::get(input)?).map_err(|e| wire_error(e.to_string()))
    }
}

impl Wire for bool {
    fn put(&self, out: &mut Vec<u8>) {
        u8::from(*self).put(out)
    }
    fn get(input: &mut &[u8]) -> Result<Self> {
        Ok(u8::get(input)? != 0)
    }
}

impl Wire for String {
    fn put(&self, out: &mut Vec<u8>) {
        self.len().put(out);
        out.extend_from_slice(self.as_bytes());
    }
    fn get(input: &mut &[u8]) -> Result<Self> {
        let n = usize::get(input)?;
        String::from_utf8(take(input, n)?.to_vec()).map_err(|e| wire_error(e.to_string()))
    }
}

impl<T: Wire> Wire for Option<T> {
    fn put(&self, out: &mut Vec<u8>) {
        self.is_some().put(out);
        if let Some(v) = self {
            v.put(out);
        }
    }
    fn get(input: &mut &[u8]) -> Result<Self> {
        Ok(if bool::get(input)? {
            Some(T::get(input)?)
        } else {
            None
        })
    }
}

impl<T: Wire> Wire for Vec<T> {
    fn put(&self, out: &mut Vec<u8>) {
        self.len().put(out);
        self.iter().for_each(|v| v.put(out));
    }
    fn get(input: &mut &[u8]) -> Result<Self> {
        let n = usize::get(input)?;
        (0..n).map(|_| T::get(input)).collect()
    }
}

impl<A: Wire, B: Wire> Wire for (A, B) {
    fn put(&self, out: &mut Vec<u8>) {
        self.0.put(out);
        self.1.put(out);
    }
    fn get(input: &mut &[u8]) -> Result<Self> {
        Ok((A::get(input)?, B::get(input)?))
    }
}

/// Floats of the tape's element type, by their bits in their own width (4 bytes for
/// `f32`, 8 for `f64`), so they arrive bitwise.
fn put_floats<F: Float>(v: impl ExactSizeIterator<Item = F>, out: &mut Vec<u8>) {
    v.len().put(out);
    if std::mem::size_of::<F>() == 4 {
        // f32 → f64 → f32 is exact.
        v.for_each(|x| out.extend_from_slice(&(x.f64() as f32).to_bits().to_le_bytes()));
    } else {
        v.for_each(|x| out.extend_from_slice(&x.f64().to_bits().to_le_bytes()));
    }
}

fn get_floats<F: Float>(input: &mut &[u8]) -> Result<Vec<F>> {
    let n = usize::get(input)?;
    let width = std::mem::size_of::<F>();
    let bytes = take(
        input,
        n.checked_mul(width)
            .ok_or_else(|| wire_error("size".into()))?,
    )?;
    Ok(if width == 4 {
        bytes
            .chunks_exact(4)
            .map(|b| F::c(f32::from_bits(u32::from_le_bytes(b.try_into().expect("4"))) as f64))
            .collect()
    } else {
        bytes
            .chunks_exact(8)
            .map(|b| F::c(f64::from_bits(u64::from_le_bytes(b.try_into().expect("8")))))
            .collect()
    })
}

/// Writes a tensor (shape, then its elements by their bits).
pub fn put_array<F: Float>(a: &ArrayD<F>, out: &mut Vec<u8>) {
    a.shape().to_vec().put(out);
    put_floats(a.iter().copied(), out);
}

/// Reads a tensor written by [`put_array`].
///
/// # Errors
/// [`Error::Config`] for truncated or malformed bytes.
pub fn get_array<F: Float>(input: &mut &[u8]) -> Result<ArrayD<F>> {
    let shape = Vec::<usize>::get(input)?;
    let v = get_floats::<F>(input)?;
    ArrayD::from_shape_vec(IxDyn(&shape), v).map_err(|e| wire_error(e.to_string()))
}

/// Writes a list of floats by their bits.
pub fn put_vec<F: Float>(v: &[F], out: &mut Vec<u8>) {
    put_floats(v.iter().copied(), out);
}

/// Reads a list written by [`put_vec`].
///
/// # Errors
/// [`Error::Config`] for truncated or malformed bytes.
pub fn get_vec<F: Float>(input: &mut &[u8]) -> Result<Vec<F>> {
    get_floats(input)
}

#[cfg(feature = "mpi")]
mod mpi_transport {
    use super::Transport;
    use crate::{Error, Result};
    use mpi::datatype::PartitionMut;
    use mpi::topology::SimpleCommunicator;
    use mpi::traits::*;
    use mpi::Count;
    use std::sync::Mutex;

    /// MPI, initialised once per process; finalised at exit (Open MPI reports a process
    /// that exits without finalising as failed).
    static UNIVERSE: Mutex<Option<Universe>> = Mutex::new(None);

    struct Universe(mpi::environment::Universe);
    // Only touched under the mutex, by the thread that drives the learner and at exit.
    unsafe impl Send for Universe {}

    extern "C" fn finalize() {
        let mut u = UNIVERSE.lock().unwrap_or_else(|p| p.into_inner());
        drop(u.take()); // MPI_Finalize
    }

    /// MPI's world communicator. Exchanges may come from any thread (a learner driven
    /// from a rayon worker, clones of one `Comm` on several threads), one at a time:
    /// MPI runs with `Serialized` threading and every exchange holds `lock`.
    pub(super) struct Mpi {
        world: SimpleCommunicator,
        rank: usize,
        size: usize,
        lock: Mutex<()>,
    }

    // SAFETY: every use of `world` holds `lock`, and MPI was initialised with
    // `Threading::Serialized`, which allows calls from any thread one at a time.
    unsafe impl Send for Mpi {}
    unsafe impl Sync for Mpi {}

    impl Mpi {
        pub(super) fn world() -> Result<Self> {
            let mut guard = UNIVERSE.lock().unwrap_or_else(|p| p.into_inner());
            if guard.is_none() {
                let (u, _) = mpi::initialize_with_threading(mpi::Threading::Serialized)
                    .ok_or_else(|| {
                        Error::Config(
                            "cannot initialise MPI: it was already initialised (or \
                             finalised) elsewhere in this process"
                                .into(),
                        )
                    })?;
                *guard = Some(Universe(u));
                // SAFETY: registering a plain `extern "C" fn` with the C library.
                unsafe { libc::atexit(finalize) };
            }
            let world = guard.as_ref().expect("initialised above").0.world();
            let (rank, size) = (world.rank() as usize, world.size() as usize);
            Ok(Mpi {
                world,
                rank,
                size,
                lock: Mutex::new(()),
            })
        }
    }

    impl Transport for Mpi {
        fn rank(&self) -> usize {
            self.rank
        }
        fn size(&self) -> usize {
            self.size
        }
        fn all_gather(&self, mine: &[u8]) -> Vec<Vec<u8>> {
            let _one_at_a_time = self.lock.lock().unwrap_or_else(|p| p.into_inner());
            let Ok(len) = Count::try_from(mine.len()) else {
                eprintln!(
                    "metagrad: rank {} has {} bytes to exchange, more than MPI counts \
                     (2 GiB); aborting",
                    self.rank,
                    mine.len()
                );
                self.world.abort(4)
            };
            let mut counts = vec![0 as Count; self.size];
            self.world.all_gather_into(&len, &mut counts[..]);
            let mut displs: Vec<Count> = Vec::with_capacity(self.size);
            let mut at: Count = 0;
            for &c in &counts {
                displs.push(at);
                at = at.checked_add(c).unwrap_or_else(|| {
                    eprintln!(
                        "metagrad: the ranks' results exceed MPI's 2 GiB per exchange; \
                         aborting (use fewer tasks per meta-batch or f32)"
                    );
                    self.world.abort(4)
                });
            }
            let total: usize = counts.iter().map(|&c| c as usize).sum();
            let mut buf = vec![0u8; total];
            {
                let mut part = PartitionMut::new(&mut buf[..], &counts[..], &displs[..]);
                self.world.all_gather_varcount_into(mine, &mut part);
            }
            counts
                .iter()
                .zip(&displs)
                .map(|(&c, &d)| buf[d as usize..(d + c) as usize].to_vec())
                .collect()
        }
        fn abort(&self, code: i32) -> ! {
            self.world.abort(code)
        }
        fn name(&self) -> &'static str {
            "mpi"
        }
    }
}
