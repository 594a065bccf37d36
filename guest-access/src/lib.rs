//! guest-access: placeholder until its issue lands.
