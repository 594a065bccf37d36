//! insn-emu: placeholder until its issue lands.
