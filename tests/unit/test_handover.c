/* The handover document an upgrade leaves the next image: round trips,
 * refusals, and the /proc facts that tell a child from a stranger. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "handover.h"

static struct handover sample(struct handover_child *kids, struct handover_conn *conns)
{
    kids[0] = (struct handover_child){ .model = "tiny", .no = 1, .pid = 4242, .port = 9001,
                                       .start_time = 123456789ULL, .argv_hash = 0xfedcba9876543210ULL,
                                       .out_fd = 12, .api_key = "k3y", .spawned_at = 1796000000.25,
                                       .ready_at = 1796000003.5, .restarts = 2, .slots = 4,
                                       .metrics = true, .device = 1 };
    strcpy(kids[0].state, "ready");
    strcpy(kids[0].visible, "GPU-abc");
    kids[1] = (struct handover_child){ .model = "a model with spaces", .no = 7, .pid = 4343, .port = 9002,
                                       .start_time = 5, .argv_hash = 1, .out_fd = -1, .device = -1 };
    strcpy(kids[1].state, "starting");
    conns[0] = (struct handover_conn){ .fd = 20, .trusted = true, .control = false };
    conns[1] = (struct handover_conn){ .fd = 21, .trusted = false, .control = true };
    return (struct handover){ .pid = 100, .from_version = "0.1.0", .control_fd = 5, .public_fd = 6,
                              .control_addr = "/run/llama-pool/control.sock", .public_addr = "127.0.0.1:8080",
                              .conns = conns, .nconns = 2, .children = kids, .nchildren = 2, .reply_fd = 9,
                              .started_at = 1795999999.0, .upgrades = 3 };
}

static void a_handover_comes_back_as_it_was_written(void **state)
{
    (void)state;
    struct handover_child kids[2];
    struct handover_conn conns[2];
    struct handover h = sample(kids, conns), back;
    char err[256];
    int fd = handover_write(&h, err, sizeof err);
    assert_true(fd >= 0);
    assert_int_equal(handover_read(fd, &back, err, sizeof err), 0);
    close(fd);
    assert_int_equal(back.pid, 100);
    assert_string_equal(back.from_version, "0.1.0");
    assert_int_equal(back.control_fd, 5);
    assert_int_equal(back.public_fd, 6);
    assert_int_equal(back.reply_fd, 9);
    assert_string_equal(back.control_addr, "/run/llama-pool/control.sock");
    assert_string_equal(back.public_addr, "127.0.0.1:8080");
    assert_true(back.started_at == 1795999999.0);
    assert_int_equal(back.upgrades, 3);
    assert_int_equal(back.nconns, 2);
    assert_true(back.conns[0].fd == 20 && back.conns[0].trusted && !back.conns[0].control);
    assert_true(back.conns[1].fd == 21 && !back.conns[1].trusted && back.conns[1].control);
    assert_int_equal(back.nchildren, 2);
    const struct handover_child *c = &back.children[0];
    assert_string_equal(c->model, "tiny");
    assert_true(c->no == 1 && c->pid == 4242 && c->port == 9001 && c->out_fd == 12);
    assert_true(c->start_time == 123456789ULL && c->argv_hash == 0xfedcba9876543210ULL);
    assert_string_equal(c->api_key, "k3y");
    assert_string_equal(c->state, "ready");
    assert_true(c->spawned_at == 1796000000.25 && c->ready_at == 1796000003.5);
    assert_true(c->restarts == 2 && c->slots == 4 && c->metrics && c->device == 1);
    assert_string_equal(c->visible, "GPU-abc");
    c = &back.children[1];
    assert_string_equal(c->model, "a model with spaces");
    assert_true(c->out_fd == -1 && c->api_key == NULL && c->device == -1 && !c->metrics);
    assert_string_equal(c->state, "starting");
    handover_free(&back);
}

static int from_text(const char *text, struct handover *h, char *err, size_t len)
{
    json_error_t jerr;
    json_t *j = json_loads(text, 0, &jerr);
    if (!j)
        fail_msg("test JSON does not parse: %s", jerr.text);
    int rc = handover_from_json(j, h, err, len);
    json_decref(j);
    return rc;
}

static void a_document_that_is_not_a_handover_is_refused_with_a_reason(void **state)
{
    (void)state;
    static const struct { const char *doc, *why; } bad[] = {
        { "[]", "not a JSON object" },
        { "{\"version\":2,\"pid\":1}", "version is not 1" },
        { "{\"version\":1,\"pid\":\"x\"}", "wrong kind" },
        { "{\"version\":1,\"pid\":1,\"conns\":[{\"fd\":-3,\"trusted\":true,\"control\":true}]}", "connection 0" },
        { "{\"version\":1,\"pid\":1,\"children\":[{\"model\":\"m\",\"no\":1,\"pid\":2,\"port\":3,"
          "\"start_time\":4,\"argv_hash\":\"zz\",\"state\":\"ready\"}]}", "not a 64-bit hex" },
        { "{\"version\":1,\"pid\":1,\"children\":[{\"model\":\"m\",\"no\":1,\"pid\":2,\"port\":3,"
          "\"start_time\":4,\"argv_hash\":\"ab\",\"state\":\"crashed\"}]}", "not starting, ready or stopping" },
        { "{\"version\":1,\"pid\":1,\"children\":[{\"model\":\"m\",\"no\":1,\"pid\":2,\"port\":70000,"
          "\"start_time\":4,\"argv_hash\":\"ab\",\"state\":\"ready\"}]}", "wrong kind" },
    };
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        struct handover h;
        char err[256] = "";
        assert_int_equal(from_text(bad[i].doc, &h, err, sizeof err), -1);
        if (!strstr(err, bad[i].why))
            fail_msg("%s: said \"%s\", expected \"%s\"", bad[i].doc, err, bad[i].why);
        handover_free(&h);
    }
}

static void a_non_json_memfd_is_refused(void **state)
{
    (void)state;
    char path[] = "/tmp/handover-XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    unlink(path);
    assert_int_equal(write(fd, "{not json", 9), 9);
    struct handover h;
    char err[256];
    assert_int_equal(handover_read(fd, &h, err, sizeof err), -1);
    assert_non_null(strstr(err, "not JSON"));
    handover_free(&h);
    close(fd);
}

static void the_start_time_is_field_22_whatever_the_command_name_holds(void **state)
{
    (void)state;
    unsigned long long st = 0;
    const char *line = "4242 (llama server) x) R 1 4242 4242 0 -1 4194560 100 0 0 0 5 6 0 0 20 0 1 0 "
                       "987654321 1000 10 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 0 0 0 0 0 0\n";
    assert_int_equal(handover_parse_stat(line, &st), 0);
    assert_true(st == 987654321ULL);
    assert_int_equal(handover_parse_stat("4242 (cut short) R 1 2 3", &st), -1);
    assert_int_equal(handover_parse_stat("no parenthesis at all", &st), -1);
}

static void a_childs_cmdline_hashes_as_its_argv(void **state)
{
    (void)state;
    char *argv[] = { "sleep", "30", NULL };
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        execvp(argv[0], argv);
        _exit(127);
    }
    unsigned long long st = 0, st2 = 0;
    uint64_t hash = 0, hash2 = 0;
    /* Until the exec has happened its cmdline is the test's. */
    for (int i = 0; i < 1000 && hash != handover_argv_hash(argv); i++) {
        assert_int_equal(handover_proc(pid, &st, &hash), 0);
        usleep(1000);
    }
    assert_true(hash == handover_argv_hash(argv));
    assert_int_equal(handover_proc(pid, &st2, &hash2), 0);
    assert_true(st > 0 && st == st2);
    char *other[] = { "sleep", "31", NULL };
    assert_true(handover_argv_hash(other) != hash);
    kill(pid, SIGKILL);
    waitpid(pid, NULL, 0);
    assert_int_equal(handover_proc(pid, &st, &hash), -1);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(a_handover_comes_back_as_it_was_written),
        cmocka_unit_test(a_document_that_is_not_a_handover_is_refused_with_a_reason),
        cmocka_unit_test(a_non_json_memfd_is_refused),
        cmocka_unit_test(the_start_time_is_field_22_whatever_the_command_name_holds),
        cmocka_unit_test(a_childs_cmdline_hashes_as_its_argv),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
