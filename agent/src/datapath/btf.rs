//! Where a field lies in one of the running kernel's structures, read from its BTF (`/sys/kernel/btf/vmlinux`):
//! for the programs that read a kernel structure the verifier lets them read through a BTF pointer. aya reads BTF
//! too, but keeps its type accessors to itself; the format's walk is short enough to do here.

use std::path::Path;

const VMLINUX: &str = "/sys/kernel/btf/vmlinux";
const MAGIC: u16 = 0xeb9f;
const KIND_STRUCT: u32 = 4;

/// The byte offset of `member` in the kernel's `struct name`, if its BTF has it (and it starts on a byte).
pub fn member_offset(name: &str, member: &str) -> Option<u32> {
    member_offset_in(&std::fs::read(Path::new(VMLINUX)).ok()?, name, member)
}

fn member_offset_in(btf: &[u8], name: &str, member: &str) -> Option<u32> {
    let u16_at = |at: usize| Some(u16::from_le_bytes(btf.get(at..at + 2)?.try_into().ok()?));
    let u32_at = |at: usize| Some(u32::from_le_bytes(btf.get(at..at + 4)?.try_into().ok()?));
    if u16_at(0)? != MAGIC {
        return None;
    }
    let header = u32_at(4)? as usize;
    let (types, types_len) = (header + u32_at(8)? as usize, u32_at(12)? as usize);
    let strings = header + u32_at(16)? as usize;
    let string = |offset: u32| {
        let start = strings + offset as usize;
        let end = start + btf.get(start..)?.iter().position(|&byte| byte == 0)?;
        std::str::from_utf8(&btf[start..end]).ok()
    };
    let mut at = types;
    while at + 12 <= types + types_len {
        let (name_offset, info) = (u32_at(at)?, u32_at(at + 4)?);
        let (kind, vlen, bitfields) = ((info >> 24) & 0x1f, (info & 0xffff) as usize, info >> 31 == 1);
        let members = at + 12;
        if kind == KIND_STRUCT && string(name_offset) == Some(name) {
            for index in 0..vlen {
                let entry = members + index * 12;
                if string(u32_at(entry)?) == Some(member) {
                    let offset = u32_at(entry + 8)?;
                    // With bit fields in the struct, the offset's high byte is the field's width.
                    let bits = if bitfields { offset & 0x00ff_ffff } else { offset };
                    return (bits % 8 == 0).then_some(bits / 8);
                }
            }
            return None;
        }
        // Each kind's data after the common 12 bytes.
        at = members
            + match kind {
                1 | 14 | 17 => 4,             // int, var, decl tag
                3 => 12,                      // array
                4 | 5 | 15 | 19 => 12 * vlen, // struct, union, datasec, enum64
                6 | 13 => 8 * vlen,           // enum, function prototype
                _ => 0,
            };
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_where_the_acknowledged_byte_count_lies_in_the_running_kernels_tcp_sock() {
        // Every kernel this agent runs on has BTF (the classifier needs it too); tcp_sock begins with the
        // inet_connection_sock, so its counters lie well past the start.
        let offset = member_offset("tcp_sock", "bytes_acked").expect("tcp_sock.bytes_acked in the kernel's BTF");
        assert!(offset > 1000 && offset % 8 == 0, "offset {offset}");
        // Where a joining socket's stream stands, for the relay's sequence numbers.
        let copied_seq = member_offset("tcp_sock", "copied_seq").expect("tcp_sock.copied_seq in the kernel's BTF");
        assert!(copied_seq > 1000 && copied_seq % 4 == 0, "offset {copied_seq}");
        assert_eq!(member_offset("tcp_sock", "no_such_member"), None);
        assert_eq!(member_offset("no_such_struct", "bytes_acked"), None);
    }
}
