/* memvisor TCG plugin: count executions of a few guest virtual addresses without stopping
 * the VM. Addresses and counters live in a file shared with the host (mmap). */
#include <stdint.h>
#include <stddef.h>
#include <fcntl.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

typedef uint64_t qemu_plugin_id_t;
struct qemu_plugin_tb;
struct qemu_plugin_insn;
enum qemu_plugin_op { QEMU_PLUGIN_INLINE_ADD_U64 };
typedef void (*tb_trans_cb_t)(qemu_plugin_id_t id, struct qemu_plugin_tb *tb);
void qemu_plugin_register_vcpu_tb_trans_cb(qemu_plugin_id_t id, tb_trans_cb_t cb);
size_t qemu_plugin_tb_n_insns(const struct qemu_plugin_tb *tb);
struct qemu_plugin_insn *qemu_plugin_tb_get_insn(const struct qemu_plugin_tb *tb, size_t idx);
uint64_t qemu_plugin_insn_vaddr(const struct qemu_plugin_insn *insn);
void qemu_plugin_register_vcpu_insn_exec_inline(struct qemu_plugin_insn *insn,
                                                enum qemu_plugin_op op, void *ptr, uint64_t imm);

__attribute__((visibility("default"))) int qemu_plugin_version = 1;

#define MAGIC 0x746e756f63766d6dULL /* "mmvcount" */
#define MAX_ADDRS 64
struct shared {
    volatile uint64_t magic, n, generation, translated;
    volatile uint64_t addr[MAX_ADDRS];
    volatile uint64_t count[MAX_ADDRS];
};
static struct shared *sh;

static void on_tb(qemu_plugin_id_t id, struct qemu_plugin_tb *tb)
{
    uint64_t n = sh->n < MAX_ADDRS ? sh->n : MAX_ADDRS;
    size_t k = qemu_plugin_tb_n_insns(tb);
    if (n == 0) return;
    for (size_t i = 0; i < k; i++) {
        struct qemu_plugin_insn *insn = qemu_plugin_tb_get_insn(tb, i);
        uint64_t va = qemu_plugin_insn_vaddr(insn);
        for (uint64_t j = 0; j < n; j++) {
            if (sh->addr[j] == va) {
                qemu_plugin_register_vcpu_insn_exec_inline(
                    insn, QEMU_PLUGIN_INLINE_ADD_U64, (void *)&sh->count[j], 1);
                sh->translated++;
            }
        }
    }
}

__attribute__((visibility("default")))
int qemu_plugin_install(qemu_plugin_id_t id, const void *info, int argc, char **argv)
{
    const char *path = NULL;
    for (int i = 0; i < argc; i++)
        if (strncmp(argv[i], "counters=", 9) == 0) path = argv[i] + 9;
    if (!path) return -1;
    int fd = open(path, O_RDWR);
    if (fd < 0) return -1;
    sh = mmap(NULL, sizeof(struct shared), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (sh == MAP_FAILED || sh->magic != MAGIC) return -1;
    qemu_plugin_register_vcpu_tb_trans_cb(id, on_tb);
    return 0;
}
