//! guest-symbols: placeholder until its issue lands.
