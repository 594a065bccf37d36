//! introspect: placeholder until its issue lands.
