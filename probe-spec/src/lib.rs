//! probe-spec: placeholder until its issue lands.
