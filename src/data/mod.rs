//! Tasks and data: sinusoid regression, N-way K-shot episodes, Omniglot.
