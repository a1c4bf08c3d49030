//! VNP wire format, token MAC and option TLVs. Pure: no I/O.
